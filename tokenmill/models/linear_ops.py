"""The matmul every linear layer calls: PyTorch's, except for skinny bfloat16 products on CPUs
with AVX512-BF16, where tokenmill's native kernel streams the weights about twice as fast."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Up to this many rows the native kernel beats the library GEMM (measured: BENCHMARKS.md).
NATIVE_MAX_ROWS = 4


@functools.cache
def _native_kernels():
    from tokenmill.attention.backends.cpu_kernels import cpu_kernels

    kernels = cpu_kernels()
    return kernels if kernels is not None and kernels.has_avx512_bf16() else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in]^T (+ bias)."""
    if (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.dim() == 2
        and x.shape[0] <= NATIVE_MAX_ROWS
        and weight.shape[1] % 32 == 0
        and weight.shape[0] % 4 == 0
        and weight.dtype == torch.bfloat16
    ):
        kernels = _native_kernels()
        if kernels is not None:
            y = kernels.linear_bf16(x.contiguous(), weight)
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)
