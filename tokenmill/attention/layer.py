"""The attention layer a model file uses: it reads the step's context, the backend does the math."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.attention.backends.base import AttentionSpec, BaseAttentionBackend
from tokenmill.attention.context import get_forward_context


class Attention(nn.Module):
    def __init__(self, spec: AttentionSpec, backend: BaseAttentionBackend) -> None:
        super().__init__()
        self.spec = spec
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H * D]."""
        ctx = get_forward_context()
        idx = self.spec.layer_idx
        kv_scale = None if ctx.kv_scales is None else ctx.kv_scales[idx]
        out = self.backend.forward(
            self.spec, q, k, v, ctx.kv_caches[idx], ctx.metadata, kv_scale=kv_scale
        )
        return out.reshape(out.shape[0], -1)
