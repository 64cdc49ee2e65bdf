"""The attention backend interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from tokenmill.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention layer needs from its backend."""

    layer_idx: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None  # attend to at most this many most recent keys

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


class BaseAttentionBackend(ABC):
    """Writes the step's new K/V into the paged cache, then attends over it.

    Contract: every layer writes the K/V of all scheduled tokens of the batch before any of the
    batch's attention reads the cache. The scheduler relies on this to let a request read
    prefix blocks that another request fills in the same step.

    A quantized cache (int8 / fp8 values, attention/kv_quant.py) comes with `kv_scale`, for
    backends with `reads_quantized_kv`; others raise ConfigError (quantized_kv_unsupported).
    """

    name: str = "base"
    reads_quantized_kv: bool = False

    @abstractmethod
    def forward(
        self,
        spec: AttentionSpec,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        kv_scale: torch.Tensor | None = None,  # [2, num_blocks, num_kv_heads, block_size]
    ) -> torch.Tensor:
        """Returns the attention output [T, num_heads, head_dim]."""


def quantized_kv_unsupported(backend_name: str) -> str:
    return (
        f"the {backend_name} attention backend does not read a quantized (int8/fp8) KV cache; "
        "use --attention-backend torch, or --kv-cache-dtype auto"
    )


def write_kv(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    # [num_blocks, block_size, Hkv, D] -> [num_slots, Hkv, D]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(kv_cache.dtype))
