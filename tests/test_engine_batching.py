"""Greedy outputs do not depend on how a request is scheduled: alone, in a batch of 32 mixed
lengths, chunked into 7-token pieces, after a prefix-cache hit, or after preemption."""

from __future__ import annotations

import dataclasses

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.build import engine_sharing_weights

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def engine_like(base: LLM, *, cache: dict | None = None, scheduler: dict | None = None) -> LLM:
    """A new engine over the same loaded weights (its own runner, KV cache and scheduler)."""
    cfg = base.engine.config
    cfg = dataclasses.replace(
        cfg,
        cache=dataclasses.replace(cfg.cache, **(cache or {})),
        scheduler=dataclasses.replace(cfg.scheduler, **(scheduler or {})),
    )
    return LLM.from_engine(engine_sharing_weights(base.engine, cfg))


@pytest.fixture(scope="module")
def prompts(llm_fp32, sharegpt_prompts) -> list[list[int]]:
    tokenizer = llm_fp32.get_tokenizer()
    lengths = [3, 5, 8, 13, 17, 24, 31, 40, 47, 64, 77, 90, 110, 128, 150, 170] * 2
    out = []
    for i, n in enumerate(lengths):
        ids = tokenizer.encode(sharegpt_prompts[i * 7])
        ids = (ids * (n // max(1, len(ids)) + 1))[:n]
        out.append(ids)
    return out


@pytest.fixture(scope="module")
def alone(llm_fp32, prompts) -> list[list[int]]:
    results = []
    for p in prompts:
        results.append(llm_fp32.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids)
    return results


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.slow
def test_batch_of_32_equals_alone(llm_fp32, prompts, alone):
    assert len(prompts) == 32
    llm = engine_like(llm_fp32, cache={"enable_prefix_caching": False})
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == alone


@pytest.mark.slow
def test_tiny_prefill_chunks_equal_alone(llm_fp32, prompts, alone):
    llm = engine_like(
        llm_fp32, cache={"enable_prefix_caching": False}, scheduler={"max_num_batched_tokens": 7}
    )
    subset = list(range(0, 32, 4))
    outputs = llm.generate([prompts[i] for i in subset], GREEDY, use_tqdm=False)
    assert token_ids(outputs) == [alone[i] for i in subset]


@pytest.mark.slow
def test_prefix_cache_hit_equals_alone(llm_fp32, prompts, alone):
    llm = engine_like(llm_fp32)
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    second = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert token_ids(second) == alone
    assert token_ids(first) == alone
    # Every prompt of 17+ tokens hits at least one whole block the second time.
    hits = [o.num_cached_tokens for o, p in zip(second, prompts, strict=True) if len(p) > 16]
    assert hits and all(h >= 16 for h in hits)


@pytest.mark.slow
def test_preempted_and_recomputed_equals_alone(llm_fp32, prompts, alone):
    # 24 blocks of 16 tokens: the 8 longest prompts (~140 tokens + 8 new) cannot all fit.
    llm = engine_like(
        llm_fp32, cache={"num_blocks": 24, "enable_prefix_caching": False},
        scheduler={"max_num_batched_tokens": 256},
    )  # fmt: skip
    subset = sorted(range(32), key=lambda i: -len(prompts[i]))[:8]
    outputs = llm.generate([prompts[i] for i in subset], GREEDY, use_tqdm=False)
    assert llm.engine.stats().num_preemptions > 0
    assert token_ids(outputs) == [alone[i] for i in subset]
    assert llm.engine.stats().kv_cache_usage == 0


def test_engines_sharing_weights_keep_their_own_kv_memory(llm_fp32, prompts, alone):
    first = engine_like(llm_fp32, cache={"num_blocks": 24})
    assert token_ids(first.generate([prompts[-1]], GREEDY, use_tqdm=False)) == [alone[-1]]
    # A second engine over the same weights fills all of its own 24 blocks with other tokens.
    other = engine_like(llm_fp32, cache={"num_blocks": 24, "enable_prefix_caching": False})
    filler = (prompts[-2] + prompts[-3] + prompts[-4])[: 24 * 16 - 16]
    other.generate([filler], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
    # The first engine's cached prefix was not touched: it hits and still answers the same.
    again = first.generate([prompts[-1]], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == (len(prompts[-1]) - 1) // 16 * 16
    assert again.outputs[0].token_ids == alone[-1]


def test_seeded_sampling_is_independent_of_the_batch(llm_fp32, prompts):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    alone = llm_fp32.generate([prompts[5]], params, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm_fp32.generate(prompts[:8], params, use_tqdm=False)
    assert batch[5].outputs[0].token_ids == alone
    other_seed = dataclasses.replace(params, seed=99)
    again = llm_fp32.generate([prompts[5]], other_seed, use_tqdm=False)[0].outputs[0].token_ids
    assert again != alone


def test_n_samples_share_the_prompt_blocks(llm_fp32, prompts):
    llm = engine_like(llm_fp32)
    prompt = prompts[-1]  # 170 tokens: 10 full blocks
    before = llm.engine.stats().prefix_cache_hits
    out = llm.generate([prompt], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=7))[0]
    assert len(out.outputs) == 4
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # different samples
    # Three of the four children found the first child's prompt blocks in the cache.
    assert llm.engine.stats().prefix_cache_hits - before >= 3 * 160
