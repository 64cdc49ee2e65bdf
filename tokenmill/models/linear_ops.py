"""The matmul every linear layer calls: PyTorch's, except on CPUs with AVX-512, where
tokenmill's native GEMMs run on the weight packed once into their panel layout: bfloat16 with
AVX512-BF16 (tokenmill/native/csrc/gemm_bf16_cpu.cpp) and float32
(tokenmill/native/csrc/gemm_f32_cpu.cpp). Both beat the library GEMM at every batch size
measured here (BENCHMARKS.md), most at decode sizes, where the library repacks the weight on
every call. A model's weights are held once: on first use a layer's float weight is replaced by
its PackedWeight (`compute_weight`), and a tied embedding table looks its rows up in the
panels (`PackedEmbedding`).
RMSNorm of bfloat16 rows on such CPUs also goes native: PyTorch's bf16 kernel is ~10x slower.
A weight held quantized (tokenmill/quant) goes to the native integer kernel
(tokenmill/native/csrc/quant_gemm_cpu.cpp), or to its PyTorch reference off the CPU."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.quant.packing import QuantizedWeight
from tokenmill.quant.reference import dequantize_rows, reference_matmul

_PACKED_ATTR = "_tokenmill_packed"
_PANEL = 16  # output rows per column panel, both layouts


@dataclass(eq=False)
class PackedWeight:
    """A float weight W [out, in] held only as a native GEMM's column panels (a permutation of
    its elements, no padding): bf16 [N/16, K/2, 16, 2] with W[16 nb + c, 2 kp + j] at
    [nb, kp, c, j]; fp32 [N/16, K, 16] with W[16 nb + c, k] at [nb, k, c]."""

    packed: torch.Tensor
    out_features: int
    in_features: int

    @property
    def dtype(self) -> torch.dtype:
        return self.packed.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _by_row(self) -> torch.Tensor:
        """A view (N/16, 16, ...) whose trailing dims, flattened, are the in_features of a row."""
        return self.packed.permute((0, 2, 1, 3) if self.packed.dim() == 4 else (0, 2, 1))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W[ids]: [*ids.shape, in] (an embedding lookup), copied out of the panels."""
        return self._by_row()[ids // _PANEL, ids % _PANEL].reshape(*ids.shape, self.in_features)

    def unpack(self) -> torch.Tensor:
        """W [out, in], a copy, for the products the native GEMM does not take."""
        return self._by_row().reshape(self.shape)


class PackedEmbedding(nn.Module):
    """An embedding table that is also the tied output head, held once as the head's panels."""

    def __init__(self, weight: PackedWeight) -> None:
        super().__init__()
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(ids)


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
    # A bare tensor (no module to swap its weight in) is packed once and keeps the panels beside
    # it; a model's layers hold only the panels (compute_weight).
    packed = getattr(weight, _PACKED_ATTR, None)
    if packed is None:
        packed = pack(weight.detach())
        setattr(weight, _PACKED_ATTR, packed)
    return packed


def pack_weight(weight: torch.Tensor) -> PackedWeight | None:
    """The packed form of a float weight [out, in] where a native GEMM takes it, else None."""
    if weight.device.type != "cpu" or weight.dim() != 2 or weight.shape[0] % _PANEL:
        return None
    if weight.dtype == torch.bfloat16 and weight.shape[1] % 2:
        return None
    native = _native_gemm(weight.dtype)
    if native is None:
        return None
    pack, _ = native
    packed = getattr(weight, _PACKED_ATTR, None)
    packed = pack(weight.detach()) if packed is None else packed
    return PackedWeight(packed, *weight.shape)


def compute_weight(module: nn.Module) -> torch.Tensor | PackedWeight | QuantizedWeight:
    """`module.weight` as the matmul reads it. On first use a float weight that a native GEMM
    takes is replaced by its PackedWeight: the float tensor is freed, the weight held once."""
    weight = module.weight
    if isinstance(weight, torch.Tensor) and not isinstance(module, nn.Embedding):
        packed = pack_weight(weight)
        if packed is not None:
            del module.weight  # the float Parameter goes; the panels are the weight now
            module.weight = weight = packed
    return weight


def tied_head_weight(owner: nn.Module, name: str = "embed_tokens"):
    """The weight of an output head tied to the embedding `owner.<name>`. On first use a float
    table a native GEMM takes becomes a PackedEmbedding: lookups and the head read one copy."""
    table = getattr(owner, name)
    if isinstance(table, nn.Embedding):
        packed = pack_weight(table.weight)
        if packed is not None:
            setattr(owner, name, PackedEmbedding(packed))
            return packed
    return table.weight


def float_weight(weight: torch.Tensor | PackedWeight) -> torch.Tensor:
    """A float weight [out, in] whichever way it is held (packed: unpacked, a copy)."""
    return weight.unpack() if isinstance(weight, PackedWeight) else weight.detach()


def weight_rows(weight: torch.Tensor | PackedWeight | QuantizedWeight, start: int, size: int):
    """Rows [start, start + size) of a weight, as float32 [size, in], however it is held."""
    if isinstance(weight, QuantizedWeight):
        ids = torch.arange(start, start + size, device=weight.packed.device)
        return dequantize_rows(weight, ids, torch.float32)
    if isinstance(weight, PackedWeight):
        return weight.rows(torch.arange(start, start + size, device=weight.device)).float()
    return weight.detach()[start : start + size].float()


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
    packed = weight.packed if isinstance(weight, PackedWeight) else packed_weight(pack, weight)
    return native_kernels().gemm_bf16_argmax(x.contiguous(), packed)


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x [..., in] @ W^T for a packed quantized weight, in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.device.type == "cpu" and rows.dtype in (torch.bfloat16, torch.float32):
        from tokenmill.native import kernels as native_kernels

        kernels = native_kernels()
        if kernels is not None:
            w = weight
            y = kernels.quant_gemm(
                rows.contiguous(), w.packed, w.bits, w.has_min, w.group, w.out_features,
                w.act_bits,
            )  # fmt: skip
            return y.reshape(*x.shape[:-1], w.out_features)
    return reference_matmul(rows, weight).reshape(*x.shape[:-1], weight.out_features)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in]^T (+ bias); `weight` may be a PackedWeight or a packed
    QuantizedWeight."""
    if isinstance(weight, QuantizedWeight):
        y = quantized_linear(x, weight)
        return y if bias is None else y + bias
    if isinstance(weight, PackedWeight):
        native = _native_gemm(x.dtype) if x.dtype == weight.dtype else None
        if native is None or x.device.type != "cpu":
            return F.linear(x, weight.unpack().to(x.dtype), bias)
        _, gemm = native
        y = gemm(x.reshape(-1, x.shape[-1]).contiguous(), weight.packed)
        y = y.reshape(*x.shape[:-1], weight.out_features)
        return y if bias is None else y + bias
    if _native_shapes(x, weight):
        native = _native_gemm(x.dtype)
        if native is not None:
            pack, gemm = native
            y = gemm(x.contiguous(), packed_weight(pack, weight))
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)
