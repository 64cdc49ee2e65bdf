"""A GGUF tensor's blocks -> QuantTensor, keeping the file's integers and scales.

Exact for Q8_0, Q4_0 (its min is -8 * scale), Q4_1, Q5_0 (q - 16 as 8-bit), Q5_1 and Q4_K
(scale = d * sc and min = -dmin * m per 32 values, each rounded once to fp16). Q6_K keeps a
scale per 16 values, finer than the kernel's 32-value blocks: it is recomputed as 8-bit per
32 (an error about a quarter of Q6_K's own), as is any other block format. Byte layouts follow
ggml (see tokenmill/loader/gguf_dequant.py, which decodes the same blocks to floats).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tokenmill.loader.gguf_dequant import QK_K, _k_scale_min, _nibbles, dequantize
from tokenmill.quant.packing import QuantTensor
from tokenmill.quant.quantize import quantize_int8

T = GGMLQuantizationType


def _f16(b: torch.Tensor, start: int) -> torch.Tensor:
    return b[:, start : start + 2].contiguous().view(torch.float16).float()  # (n, 1)


def _fifth_bits(b: torch.Tensor, start: int) -> torch.Tensor:
    qh = b[:, start : start + 4].contiguous().view(torch.int32)
    return ((qh >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.int16)  # (n, 32)


def _blocks(b: torch.Tensor, ggml_type: T):
    """(q [nb, block], scale [nb, subs], min or None, bits) for one tensor's blocks."""
    n = b.shape[0]
    if ggml_type == T.Q8_0:
        return b[:, 2:].contiguous().view(torch.int8).to(torch.int16), _f16(b, 0), None, 8
    if ggml_type == T.Q4_0:
        q = _nibbles(b[:, 2:], 16).reshape(n, 32).to(torch.int16)
        return q, _f16(b, 0), -8.0 * _f16(b, 0), 4
    if ggml_type == T.Q4_1:
        q = _nibbles(b[:, 4:], 16).reshape(n, 32).to(torch.int16)
        return q, _f16(b, 0), _f16(b, 2), 4
    if ggml_type == T.Q5_0:
        low = _nibbles(b[:, 6:], 16).reshape(n, 32).to(torch.int16)
        return (low | _fifth_bits(b, 2) << 4) - 16, _f16(b, 0), None, 8
    if ggml_type == T.Q5_1:
        low = _nibbles(b[:, 8:], 16).reshape(n, 32).to(torch.int16)
        return low | _fifth_bits(b, 4) << 4, _f16(b, 0), _f16(b, 2), 8
    if ggml_type == T.Q4_K:
        sc, mn = _k_scale_min(b[:, 4:16])
        q = _nibbles(b[:, 16:], 32).reshape(n, QK_K).to(torch.int16)
        return q, _f16(b, 0) * sc.float(), -_f16(b, 2) * mn.float(), 4
    return None


def gguf_quant_tensor(raw: np.ndarray, ggml_type: T, shape: tuple[int, ...]) -> QuantTensor:
    """The 2-D tensor `shape` [N, K] stored as `raw` blocks, as a QuantTensor."""
    n, k = shape
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    b = torch.from_numpy(raw.reshape(-1, type_size).copy())
    decoded = _blocks(b, ggml_type)
    if decoded is None:  # finer scales than 32 values, or a format with no integer mapping
        return quantize_int8(dequantize(raw, ggml_type, shape).reshape(n, k), group=32)
    q, scale, mins, bits = decoded
    subs = scale.shape[1]  # scales per block: one per 32 values
    group = block_size // subs
    q = q.reshape(n, k)
    scale = scale.reshape(n, k // group).to(torch.float16).float()
    mins = None if mins is None else mins.reshape(n, k // group).to(torch.float16).float()
    return QuantTensor(q, scale, mins, bits, group)
