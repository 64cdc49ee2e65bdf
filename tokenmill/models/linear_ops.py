"""The matmul every linear layer calls: PyTorch's, except on CPUs with AVX-512, where
tokenmill's native GEMMs run on a copy of the weight packed once into their panel layout:
bfloat16 with AVX512-BF16 (tokenmill/native/csrc/gemm_bf16_cpu.cpp) and float32
(tokenmill/native/csrc/gemm_f32_cpu.cpp). Both beat the library GEMM at every batch size
measured here (BENCHMARKS.md), most at decode sizes, where the library repacks the weight on
every call.
RMSNorm of bfloat16 rows on such CPUs also goes native: PyTorch's bf16 kernel is ~10x slower.
A weight held quantized (tokenmill/quant) goes to the native integer kernel
(tokenmill/native/csrc/quant_gemm_cpu.cpp), or to its PyTorch reference off the CPU."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tokenmill.quant.packing import QuantizedWeight
from tokenmill.quant.reference import reference_matmul

_PACKED_ATTR = "_tokenmill_packed"


@functools.cache
def _native_gemm(dtype: torch.dtype):
    """(pack, gemm) of the native kernel for this dtype, or None where it is not built."""
    from tokenmill.native import kernels as native_kernels

    kernels = native_kernels()
    if kernels is None:
        return None
    if dtype == torch.bfloat16 and kernels.has_avx512_bf16():
        return kernels.pack_bf16_weight, kernels.gemm_bf16_packed
    if dtype == torch.float32 and kernels.has_avx512f():
        return kernels.pack_f32_weight, kernels.gemm_f32_packed
    return None


@functools.cache
def _native_rms_norm():
    from tokenmill.native import kernels as native_kernels

    kernels = native_kernels()
    return kernels.rms_norm_bf16 if kernels is not None and kernels.has_avx512f() else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dimension, in float32."""
    if x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu":
        native = _native_rms_norm()
        if native is not None:
            return native(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def packed_weight(pack, weight: torch.Tensor) -> torch.Tensor:
    # Packed once per weight, kept beside it (the original stays for other callers).
    packed = getattr(weight, _PACKED_ATTR, None)
    if packed is None:
        packed = pack(weight.detach())
        setattr(weight, _PACKED_ATTR, packed)
    return packed


def _native_shapes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.dtype == weight.dtype
        and x.dtype in (torch.bfloat16, torch.float32)
        and x.device.type == "cpu"
        and x.dim() == 2
        and weight.shape[0] % 16 == 0
        and (x.dtype == torch.float32 or weight.shape[1] % 2 == 0)
    )


# Below this many rows the product is small next to the weight it streams, and the plain
# GEMM then argmax is as fast.
_ARGMAX_MIN_ROWS = 16


def linear_argmax(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """Each row's argmax of x @ weight^T (first of equal values), by the native bf16 kernel
    that never writes the [T, out] product; None where that kernel does not apply."""
    if isinstance(weight, QuantizedWeight):
        return None
    if x.dtype != torch.bfloat16 or x.shape[0] < _ARGMAX_MIN_ROWS or not _native_shapes(x, weight):
        return None
    native = _native_gemm(x.dtype)
    if native is None:
        return None
    from tokenmill.native import kernels as native_kernels

    pack, _ = native
    return native_kernels().gemm_bf16_argmax(x.contiguous(), packed_weight(pack, weight))


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x [..., in] @ W^T for a packed quantized weight, in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.device.type == "cpu" and rows.dtype in (torch.bfloat16, torch.float32):
        from tokenmill.native import kernels as native_kernels

        kernels = native_kernels()
        if kernels is not None:
            w = weight
            y = kernels.quant_gemm(
                rows.contiguous(), w.packed, w.bits, w.has_min, w.group, w.out_features
            )
            return y.reshape(*x.shape[:-1], w.out_features)
    return reference_matmul(rows, weight).reshape(*x.shape[:-1], weight.out_features)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in]^T (+ bias); `weight` may be a packed QuantizedWeight."""
    if isinstance(weight, QuantizedWeight):
        y = quantized_linear(x, weight)
        return y if bias is None else y + bias
    if _native_shapes(x, weight):
        native = _native_gemm(x.dtype)
        if native is not None:
            pack, gemm = native
            y = gemm(x.contiguous(), packed_weight(pack, weight))
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)
