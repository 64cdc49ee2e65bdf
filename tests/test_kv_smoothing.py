"""Key smoothing for a quantized KV cache (tokenmill/attention/kv_smoothing.py): K's channel
sizes moved into Q through Gemma 3's q/k norms. Attention is unchanged in exact arithmetic, and
the int8 cache's rounding costs less on the real model."""

from __future__ import annotations

import dataclasses

import torch

from tests._fixtures_loader import requires_gemma3
from tokenmill import LLM
from tokenmill.attention.kv_smoothing import key_channel_scales
from tokenmill.engine.build import engine_sharing_weights
from tokenmill.models.layers import RMSNorm
from tokenmill.quant_eval.tasks import TeacherItem
from tokenmill.quant_eval.teacher_forcing import TeacherForcer


def test_scales_follow_rows_and_gain_equal_within_rotary_pairs():
    torch.manual_seed(0)
    dim, heads = 8, 2
    w = torch.randn(heads * dim, 5)
    w[3] *= 20  # head 0, channel 3: its rotary partner is channel 7
    gain = torch.ones(dim)
    gain[1] = -6.0  # channel 1 of every head (the sign does not matter)
    s = key_channel_scales(w, heads, dim, gain)
    assert s.shape == (dim,) and (s > 0).all()
    assert torch.equal(s[: dim // 2], s[dim // 2 :])  # equal within each pair (c, c + D/2)
    assert s.log().mean().abs() < 1e-5  # geometric mean 1
    size = (w.norm(dim=1).view(heads, dim) * gain.abs()).amax(0)
    expected = torch.maximum(size[:4], size[4:])
    torch.testing.assert_close(s[:4] / s[0], expected / expected[0])
    assert s[3] == s.max() and s[1] > s[0]


def test_zero_channels_get_a_finite_scale():
    w = torch.randn(8, 5)
    w[[2, 6]] = 0.0  # a whole rotary pair without weights
    s = key_channel_scales(w, 1, 8)
    assert torch.isfinite(s).all() and (s > 0).all()


def _norms(llm: LLM) -> list[RMSNorm]:
    return [m for m in llm.engine.runner.model.modules() if isinstance(m, RMSNorm)]


def _unsmooth(llm: LLM) -> None:
    for norm in _norms(llm):
        norm.channel_scale = None


def _mean_kl(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    kls = [
        (a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1)
        for a, b in zip(ref, got, strict=True)
    ]
    return torch.cat(kls).mean().item()


@requires_gemma3
def test_gemma3_int8_cache_loses_less_with_smoothing(gemma3_fp32, sharegpt_prompts):
    tokenizer = gemma3_fp32.get_tokenizer()
    items = []
    for text in sharegpt_prompts[:40]:
        ids = tokenizer.encode(text)
        if len(ids) >= 100:
            items.append(TeacherItem(ids[:40], ids[40:100]))
        if len(items) == 2:
            break
    cfg = gemma3_fp32.engine.config
    no_prefix = dataclasses.replace(cfg.cache, enable_prefix_caching=False)
    float_cfg = dataclasses.replace(cfg, cache=no_prefix)
    int8_cfg = dataclasses.replace(
        cfg, cache=dataclasses.replace(no_prefix, kv_cache_dtype="int8", kv_cache_memory_gib=0.25)
    )
    float_engine = engine_sharing_weights(gemma3_fp32.engine, float_cfg)
    try:
        plain_ref = [TeacherForcer(float_engine).logits(it) for it in items]
        int8_engine = engine_sharing_weights(gemma3_fp32.engine, int8_cfg)  # smooths the keys
        assert sum(n.channel_scale is not None for n in _norms(gemma3_fp32)) == 2 * len(
            gemma3_fp32.engine.runner.model.model.layers
        )
        smoothed_ref = [TeacherForcer(float_engine).logits(it) for it in items]
        smoothed = [TeacherForcer(int8_engine).logits(it) for it in items]
        _unsmooth(gemma3_fp32)
        plain = [TeacherForcer(int8_engine).logits(it) for it in items]
    finally:
        _unsmooth(gemma3_fp32)
    # Exact in real arithmetic: over a float32 cache only the rounding moves.
    assert _mean_kl(plain_ref, smoothed_ref) < 1e-7
    kl_plain, kl_smooth = _mean_kl(plain_ref, plain), _mean_kl(plain_ref, smoothed)
    print(f"int8 cache KL vs float32 cache: {kl_plain:.2e} plain, {kl_smooth:.2e} smoothed")
    assert kl_smooth < kl_plain / 2
