"""Building blocks shared by model files: norms, rotary embeddings, fused linear layers."""

from __future__ import annotations

import math

import torch
from torch import nn

from tokenmill.errors import UnsupportedModelError
from tokenmill.models.linear_ops import compute_weight, linear, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm, normalised in float32 whatever the model dtype (torch's fused kernel does so).

    `offset=1.0` gives Gemma's variant, which scales by (1 + weight) in float32.
    """

    def __init__(self, hidden_size: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.ones(hidden_size) if offset == 0 else torch.zeros(hidden_size)
        )
        self.eps = eps
        self.offset = offset
        # float32 [hidden], multiplied into the gain: key smoothing for an int8 KV cache
        # (attention/kv_smoothing.py) moves K's channel sizes into Q's norm this way.
        self.channel_scale: torch.Tensor | None = None

    def gain(self) -> torch.Tensor:
        """What the normalised row is multiplied by, in float32 (channel_scale left out)."""
        return self.offset + self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset == 0 and self.channel_scale is None:
            return rms_norm(x, self.weight, self.eps)
        gain = self.gain() if self.channel_scale is None else self.gain() * self.channel_scale
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * gain).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half (GPT-NeoX layout) rotary embedding with a precomputed cos/sin table."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict | None = None,
    ) -> None:
        super().__init__()
        self.head_dim, self.max_position, self.base = head_dim, max_position, base
        self.rope_scaling = rope_scaling
        self.register_buffer("cos_cache", torch.empty(max_position, head_dim), persistent=False)
        self.register_buffer("sin_cache", torch.empty(max_position, head_dim), persistent=False)
        if self.cos_cache.device.type != "meta":
            self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the float32 cos/sin tables on the module's device."""
        device = self.cos_cache.device
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        inv_freq = _scale_inv_freq(1.0 / (self.base**exponents), self.rope_scaling)
        positions = torch.arange(self.max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
        self.cos_cache = emb.cos().to(device)
        self.sin_cache = emb.sin().to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTable:
        """The cos/sin rows of this step's positions [T], looked up once for all layers."""
        cos = self.cos_cache[positions].to(dtype)[:, None, :]  # (T, 1, D)
        sin = self.sin_cache[positions].to(dtype)[:, None, :]
        return cos, sin


RopeTable = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (T, 1, D) each


def apply_rotary(rope: RopeTable, q: torch.Tensor, k: torch.Tensor):
    """q [T, H, D], k [T, Hkv, D] rotated by their positions' angles."""
    cos, sin = rope
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _scale_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict | None) -> torch.Tensor:
    if not rope_scaling:
        return inv_freq
    rope_type = rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
    if rope_type == "default":
        return inv_freq
    factor = float(rope_scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, factor, rope_scaling)
    raise UnsupportedModelError(
        f"rope_scaling type {rope_type!r} is not supported (supported: default, linear, llama3)"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float, cfg: dict) -> torch.Tensor:
    low = float(cfg.get("low_freq_factor", 1.0))
    high = float(cfg.get("high_freq_factor", 4.0))
    old_len = float(cfg.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


class Linear(nn.Linear):
    """nn.Linear whose product goes through tokenmill's matmul dispatch (linear_ops.linear); on
    the CPU its weight becomes the native GEMM's panels on first use (linear_ops.compute_weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, compute_weight(self), self.bias)


class MergedLinear(Linear):
    """Several projections of the same input in one matmul (q/k/v, or gate/up).

    `shards` names each output slice; weight loading copies a checkpoint tensor into its slice.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shards.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        return list(out.split([size for _, size in self.shard_offsets.values()], dim=-1))
