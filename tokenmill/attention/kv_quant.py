"""Quantized KV caches: int8 or fp8 (e4m3) values with one bf16 scale per (token, KV head).

    cache   [2, NB, BS, Hkv, D]  int8 | float8_e4m3fn   K then V, the size of a float cache
    scales  [2, NB, Hkv, BS]     bfloat16               x ~= scale * value

V, and fp8's K, are laid out as in a float cache. An int8 K block is dim-pair-major, per KV
head [D/2, BS, 2] (native/csrc/paged_attention_paired.h): the decode kernel then scores 16
slots in the lanes of one register, without transposes. `read_blocks` / `read_slots` return
the usual [..., BS, Hkv, D] whatever the layout.

Per (token, KV head): scale = max|x| / qmax rounded to bf16 (qmax 127 for int8, 448 for e4m3);
value = x / scale, int8 rounded to the nearest (ties to even) within +-127, fp8 clamped to +-448
and rounded to the nearest e4m3. The native writer (native/csrc/paged_attention_kv_quant.h) does
the same arithmetic, so both write the same bytes.

K/V are quantized when written and dequantized wherever they are read: the native decode kernel
in registers, the PyTorch paths by gathering and multiplying; a fresh prompt's attention reads
its own K/V back from the cache too. Every path sees the same numbers, so a prefix-cache hit
(which reads the cached blocks) computes what a miss does. A block's scales sit at the same
block id as its values: a cached block carries them with it.
"""

from __future__ import annotations

import torch

from tokenmill.native import kernels as native_kernels

# The names --kv-cache-dtype accepts for a quantized cache, as vLLM spells them.
KV_QUANT_DTYPES: dict[str, torch.dtype] = {
    "int8": torch.int8,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
}
SCALE_DTYPE = torch.bfloat16
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in _QMAX


def memory_format(kv_cache_dtype: str) -> str:
    """The perf/kv_memory.py format a cache of this --kv-cache-dtype is sized as: int8 and fp8
    caches alike hold one byte per value and a bf16 scale per (token, KV head), kv_memory's
    "int8" (its "fp8" is the per-tensor-scaled GPU format)."""
    return "int8" if kv_cache_dtype in KV_QUANT_DTYPES else kv_cache_dtype


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (values [..., D] of `dtype`, scales [...] bf16)."""
    qmax = _QMAX[dtype]
    amax = x.abs().amax(dim=-1).float()
    scales = (amax / qmax).to(SCALE_DTYPE)
    s = scales.float()
    y = x.float() / torch.where(s > 0, s, torch.ones_like(s))[..., None]  # all zeros stay zeros
    if dtype == torch.int8:
        return y.round().clamp(-qmax, qmax).to(torch.int8), scales
    return y.clamp(-qmax, qmax).to(dtype), scales


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values [..., D], scales [...] -> [..., D] of `dtype` (the product in fp32, rounded once)."""
    return (values.float() * scales.float()[..., None]).to(dtype)


def write_kv_quantized(
    kv_cache: torch.Tensor,  # [2, NB, BS, Hkv, D] int8 | float8_e4m3fn
    kv_scale: torch.Tensor,  # [2, NB, Hkv, BS] bf16
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T]
) -> None:
    kernels = _native_writer(k, kv_cache)
    if kernels is not None:
        kernels.write_kv_quant(
            k.contiguous(), v.contiguous(), kv_cache[0], kv_cache[1], kv_scale[0], kv_scale[1],
            slot_mapping,
        )  # fmt: skip
        return
    num_tokens, num_kv_heads, head_dim = k.shape
    block_size = kv_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    for i, x in enumerate((k, v)):
        values, scales = quantize(x, kv_cache.dtype)
        kv_scale[i][blocks, :, offsets] = scales  # [T, Hkv]
        # Indexed writes have no fp8 kernel: the bytes are written as int8.
        data, values = kv_cache[i].view(torch.int8), values.view(torch.int8)
        if _is_pair_major(i, kv_cache.dtype):
            # (T, Hkv, D/2, 2) into [NB, Hkv, D/2, BS, 2] at (block, :, :, offset)
            pairs = values.view(num_tokens, num_kv_heads, head_dim // 2, 2)
            _pair_major(data)[blocks, :, :, offsets] = pairs
        else:
            # [NB, BS, Hkv, D] -> [num_slots, Hkv, D]
            data.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, values)


def _is_pair_major(which: int, dtype: torch.dtype) -> bool:
    return which == 0 and dtype == torch.int8


def _pair_major(k: torch.Tensor) -> torch.Tensor:
    """The storage [NB, BS, Hkv, D] of an int8 K as what it holds: [NB, Hkv, D/2, BS, 2]."""
    num_blocks, block_size, num_kv_heads, head_dim = k.shape
    return k.view(num_blocks, num_kv_heads, head_dim // 2, block_size, 2)


def _native_writer(k: torch.Tensor, kv_cache: torch.Tensor):
    if k.device.type != "cpu" or k.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not kv_cache[0].is_contiguous():
        return None
    return native_kernels()


def read_slots(
    kv_cache: torch.Tensor, kv_scale: torch.Tensor, which: int, slots: torch.Tensor, dtype
) -> torch.Tensor:
    """K (which=0) or V (1) of the given flat slots [n], dequantized: [n, Hkv, D]."""
    block_size, num_kv_heads, head_dim = kv_cache.shape[-3:]
    blocks, offsets = slots // block_size, slots % block_size
    if _is_pair_major(which, kv_cache.dtype):
        values = _pair_major(kv_cache[which])[blocks, :, :, offsets].flatten(-2)  # (n, Hkv, D)
    else:
        values = kv_cache[which].view(-1, num_kv_heads, head_dim)[slots]
    return dequantize(values, kv_scale[which][blocks, :, offsets], dtype)


def read_blocks(
    kv_cache: torch.Tensor, kv_scale: torch.Tensor, which: int, block_ids: torch.Tensor, dtype
) -> torch.Tensor:
    """K (which=0) or V (1) of the given blocks [...], dequantized: [..., BS, Hkv, D]."""
    if _is_pair_major(which, kv_cache.dtype):
        # (..., Hkv, D/2, BS, 2) -> (..., BS, Hkv, D/2, 2) -> (..., BS, Hkv, D)
        values = _pair_major(kv_cache[which])[block_ids].movedim(-2, -4).flatten(-2)
    else:
        values = kv_cache[which][block_ids]
    scales = kv_scale[which][block_ids].transpose(-1, -2)  # (..., BS, Hkv)
    return dequantize(values, scales, dtype)
