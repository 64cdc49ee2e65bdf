"""The matmul every linear layer calls: PyTorch's, except for bfloat16 on CPUs with
AVX512-BF16, where tokenmill's native GEMM (tokenmill/csrc/gemm_bf16_cpu.cpp) runs on a copy of
the weight packed once into its panel layout. It beats the library GEMM at every batch size
measured here (BENCHMARKS.md), most at decode sizes, where it streams weights about twice as
fast."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_PACKED_ATTR = "_tokenmill_packed_bf16"


@functools.cache
def _native_kernels():
    from tokenmill.attention.backends.cpu_kernels import cpu_kernels

    kernels = cpu_kernels()
    return kernels if kernels is not None and kernels.has_avx512_bf16() else None


def packed_weight(kernels, weight: torch.Tensor) -> torch.Tensor:
    # Packed once per weight, kept beside it (the original stays for other callers).
    packed = getattr(weight, _PACKED_ATTR, None)
    if packed is None:
        packed = kernels.pack_bf16_weight(weight.detach())
        setattr(weight, _PACKED_ATTR, packed)
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in]^T (+ bias)."""
    if (
        x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.dim() == 2
        and weight.shape[0] % 16 == 0
        and weight.shape[1] % 2 == 0
    ):
        kernels = _native_kernels()
        if kernels is not None:
            y = kernels.gemm_bf16_packed(x.contiguous(), packed_weight(kernels, weight))
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)
