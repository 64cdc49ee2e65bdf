"""GGML block formats -> torch tensors.

The common formats (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K) are decoded here with
vectorised torch ops, in the same float32 operation order as `gguf.quants` so results are
bit-identical to it (tests check); torch is several times faster than gguf's numpy code and
uses both cores (Gemma 3's 168M-element Q8_0 embedding: ~3 s in numpy). The rarer formats fall
back to `gguf.quants.dequantize`.

Every block format stores a row of ne0 values as ne0 / block_size consecutive blocks, so a
tensor's bytes reshape to [num_blocks, type_size] and decode to [num_blocks, block_size].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from tokenmill.errors import UnsupportedModelError

T = GGMLQuantizationType
QK_K = 256
# Blocks decoded per torch call: bounds the float32 temporaries to a few hundred MB.
_BLOCKS_PER_CHUNK = 1 << 18


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    # (n, 2) bytes -> (n, 1) float32
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    # (n, k*group) bytes -> (n, k, 2, group): low nibbles of each group, then its high nibbles.
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group)
    return torch.cat((q & 0x0F, q >> 4), dim=2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], 32)
    return _f16(b, 0) * (q.to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).float()
    return (_f16(b, 0) * q) + _f16(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    # qh is a little-endian u32 whose bit j is the fifth bit of value j.
    qh = b[:, 2:6].contiguous().view(torch.int32)  # (n, 1)
    high = ((qh >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)  # (n, 32)
    low = _nibbles(b[:, 6:], 16).reshape(b.shape[0], 32)
    q = (low | high << 4).to(torch.int8) - 16
    return _f16(b, 0) * q.float()


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # 12 bytes pack eight 6-bit scales and eight 6-bit mins (see ggml's get_scale_min_k4):
    # bytes 0-3 low 6 bits: scales 0-3, 4-7: mins 0-3; 8-11 nibbles + top bits of 0-7: 4-7.
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn  # (n, 8) each


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32).float()  # 8 sub-blocks of 32
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = ((qh.reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 8, 32)
    q = ((low | high << 4).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, QK_K)


_TORCH_BLOCK_DECODERS: dict[T, Callable[[torch.Tensor], torch.Tensor]] = {
    T.Q8_0: _q8_0,
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q4_K: _q4_k,
    T.Q6_K: _q6_k,
}
_PLAIN = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
FLOAT_TYPES = frozenset(_PLAIN)
# Formats decoded by gguf's numpy reference implementation.
_NUMPY_FALLBACK = frozenset(
    {T.Q5_1, T.Q2_K, T.Q3_K, T.Q5_K, T.IQ4_NL, T.IQ4_XS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S}
    | {T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M, T.TQ1_0, T.TQ2_0}
)
SUPPORTED_TYPES = frozenset(_PLAIN) | frozenset(_TORCH_BLOCK_DECODERS) | _NUMPY_FALLBACK


def check_supported(ggml_type: GGMLQuantizationType, tensor_name: str) -> None:
    if ggml_type not in SUPPORTED_TYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise UnsupportedModelError(
            f"tensor {tensor_name} has GGML type {ggml_type.name}, which tokenmill cannot "
            f"dequantize (supported: {names})"
        )


def dequantize(
    raw: np.ndarray, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    """Decode a tensor's raw bytes (uint8, as stored) into a tensor of `shape` (torch order).

    F16 and BF16 come back in their own dtype (exact, half the memory); all else as float32.
    """
    check_supported(ggml_type, "<tensor>")
    if ggml_type in _PLAIN:
        # Copy out of the read-only memory map so the tensor owns writable memory.
        return torch.from_numpy(raw.copy()).view(_PLAIN[ggml_type]).reshape(shape)
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    blocks = raw.reshape(-1, type_size)
    if ggml_type in _NUMPY_FALLBACK:
        return torch.from_numpy(gguf_dequantize(blocks, ggml_type)).reshape(shape)
    decode = _TORCH_BLOCK_DECODERS[ggml_type]
    out = torch.empty(blocks.shape[0], block_size, dtype=torch.float32)
    for start in range(0, blocks.shape[0], _BLOCKS_PER_CHUNK):
        chunk = torch.from_numpy(blocks[start : start + _BLOCKS_PER_CHUNK].copy())
        out[start : start + chunk.shape[0]] = decode(chunk)
    return out.reshape(shape)
