"""Bytes of the KV cache: per token, per block, and how many blocks a memory budget holds.

The one statement of the KV cache's size, for the planner (capacity of a chip), the validation
(the blocks a server allocates) and the engine's runner (the blocks it allocates):

    one token, one layer:  K and V, each num_kv_heads x head_dim elements (+ scales)
    one block:             num_layers x block_size tokens
    blocks in M GiB:       floor(M * 2**30 / bytes per block), at least 1

Plain numbers only (dtype by name: fp32/bf16/fp16/fp8/int8 or float32/bfloat16/float16), so the
engine can size its cache without the planner and the planner without torch.

"int8" is the engine's quantized cache (tokenmill/attention/kv_quant.py): one byte per value and
one bf16 scale per (token, KV head), so head_dim 64 fits 128 / 66 = 1.94x the blocks of bf16.
The engine's fp8 cache has that layout too and is sized as "int8"; "fp8" here is the GPU format
with a per-tensor scale (no scale bytes).
"""

from __future__ import annotations

import math

from tokenmill.models.arch_config import ArchConfig
from tokenmill.perf.dtypes import Precision


def kv_bytes_per_token_per_layer(arch: ArchConfig, kv_dtype: str = "bf16", tp: int = 1) -> float:
    """K and V of one token in one layer, scales included; with `tp`, one chip's share of the
    KV heads (a head is not split, so chips hold ceil(heads / tp) each)."""
    heads = math.ceil(arch.num_key_value_heads / tp)
    return 2 * Precision(kv=kv_dtype).kv_format.nbytes(heads, arch.head_dim)


def kv_bytes_per_token(arch: ArchConfig, kv_dtype: str = "bf16") -> float:
    """K and V of one token across all layers."""
    return arch.num_hidden_layers * kv_bytes_per_token_per_layer(arch, kv_dtype)


def kv_bytes_per_block(arch: ArchConfig, block_size: int, kv_dtype: str) -> int:
    """Bytes of one KV cache block: `block_size` tokens of every layer."""
    return math.ceil(block_size * kv_bytes_per_token(arch, kv_dtype))


def num_kv_blocks(arch: ArchConfig, block_size: int, kv_dtype: str, memory_gib: float) -> int:
    """KV blocks of `block_size` tokens that `memory_gib` GiB holds (at least one)."""
    return max(1, int(memory_gib * 2**30) // kv_bytes_per_block(arch, block_size, kv_dtype))
