"""Key smoothing for int8 KV caches: K's per-channel sizes moved into Q before K is rounded.

An int8 cache keeps one scale per (token, KV head) over the head's D channels, so when a few of
K's channels are 10-30x larger than the rest (Gemma 3 270M: up to 30x the median channel) they
set the scale and the other channels keep a few of their 255 steps: on Gemma 3 the rounding of K
cost 4.0% of the attention output (mean over layers, ShareGPT chat, float32), V's 1%.

For any positive per-channel s, q . k = (q * s) . (k / s): dividing K's channels by their
typical size before the cache rounds them, and multiplying Q's by the same, leaves attention
unchanged in exact arithmetic and spreads the int8 steps over every channel (the 4.0% above
becomes 1.4%). Rotary embedding (rotate-half) mixes channel c with c + D/2, so s is equal within
each such pair and commutes with the rotation.

s is static, read off the weights rather than calibrated on text: channel c of K has the size
||W_k[c, :]|| x |g_c| (the row of K's projection; g, the gain of the model's per-head K norm
where it has one), the larger of each rotary pair, the largest over KV heads, normalised to a
geometric mean of 1. On Gemma 3 it does as well as the channels' measured maxima (1.42% against
1.44%).

Where it applies: int8 caches only. An fp8 (e4m3) value carries its own exponent, so its
rounding error is relative to each element and uneven channels cost it nothing that smoothing
gives back (measured on Gemma 3: chat KL 4.8e-3 without, 5.1e-3 with). Among int8 caches,
models that normalise q and k per head (Gemma 3's q_norm / k_norm) take s
into those norms' gains, in float32, at no cost per token (`smooth_keys` on the attention
module). Models without such norms (Llama) are left as they are: there is no per-channel
multiply to fold s into (their projection rows may be quantized blocks), and on SmolLM2 the
gain is small (the K rounding's share of the attention error 2.0% -> 1.75%).
"""

from __future__ import annotations

import torch
from torch import nn


def key_channel_scales(
    k_weight: torch.Tensor,  # [Hkv * D, E] the K projection's rows
    num_kv_heads: int,
    head_dim: int,
    k_gain: torch.Tensor | None = None,  # [D] the per-head K norm's gain
) -> torch.Tensor:
    """s [D] float32: positive, equal within each rotary pair (c, c + D/2), geometric mean 1."""
    size = k_weight.float().norm(dim=1).view(num_kv_heads, head_dim)
    if k_gain is not None:
        size = size * k_gain.float().abs()
    size = size.amax(dim=0)
    half = head_dim // 2
    pair = torch.maximum(size[:half], size[half:])
    # A channel whose weights are all zero carries nothing: any s is exact there.
    pair = torch.where(pair > 0, pair, pair[pair > 0].min() if (pair > 0).any() else 1.0)
    s = torch.cat([pair, pair])
    return s / s.log().mean().exp()


def smooth_keys(model: nn.Module) -> None:
    """Applies key smoothing to every attention module of `model` that supports it (a
    `smooth_keys()` method). Idempotent: the scales are set, not multiplied, so runners sharing
    one model may each call it."""
    for module in model.modules():
        if module is not model and callable(getattr(module, "smooth_keys", None)):
            module.smooth_keys()
