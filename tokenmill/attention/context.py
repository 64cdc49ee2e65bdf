"""The per-step forward context: attention metadata and KV caches, visible to every layer.

Entered with `with forward_context(metadata, kv_caches):` around one model forward (with
`kv_scales` too for a quantized cache), so no state outlives the step, even when the forward
raises.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tokenmill.attention.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    metadata: AttentionMetadata
    # One tensor per layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V).
    kv_caches: list[torch.Tensor]
    # Quantized caches only (attention/kv_quant.py): per layer [2, num_blocks, num_kv_heads,
    # block_size] bf16 scales; None for a float cache.
    kv_scales: list[torch.Tensor] | None = None


_current: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar(
    "tokenmill_forward_context", default=None
)


@contextlib.contextmanager
def forward_context(
    metadata: AttentionMetadata,
    kv_caches: list[torch.Tensor],
    kv_scales: list[torch.Tensor] | None = None,
) -> Iterator[ForwardContext]:
    ctx = ForwardContext(metadata, kv_caches, kv_scales)
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def get_forward_context() -> ForwardContext:
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("attention called outside a forward_context")
    return ctx
