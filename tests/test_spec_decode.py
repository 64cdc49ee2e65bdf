"""Speculative decoding: the rejection sampler is exact, prompt lookup finds what repeats, the
draft-count controller turns itself off when extra tokens cost more than they bring, and the
engine's greedy output with speculation equals its output without."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from tokenmill import LLM
from tokenmill.engine.build import engine_sharing_weights
from tokenmill.engine.request import Request
from tokenmill.errors import ConfigError
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec import ngram
from tokenmill.spec.config import parse_speculative_config
from tokenmill.spec.controller import choose_drafts, draft_gains, ranked
from tokenmill.spec.ngram import NgramProposer, SuffixIndex
from tokenmill.spec.rejection import greedy_accept, rejection_sample

# Chi-square critical value at p = 0.001 for 4 degrees of freedom (5 outcomes).
CHI2_CRIT_DF4 = 18.467


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("draft_kind", ["equal", "disjoint", "one_hot", "point_mass"])
def test_rejection_sampler_preserves_the_target_distribution(draft_kind):
    p = torch.tensor([0.05, 0.4, 0.25, 0.3, 0.0], dtype=torch.float64)
    q_of = {
        "equal": p.clone(),
        "disjoint": torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64),
        "one_hot": torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64),
        "point_mass": None,
    }
    q = q_of[draft_kind]
    gen = torch.Generator().manual_seed(1234)
    draft_gen = torch.Generator().manual_seed(99)
    counts = torch.zeros(5, dtype=torch.float64)
    trials = 20000
    for _ in range(trials):
        # The draft token is drawn from q (point mass: always token 3).
        draft = 3 if q is None else int(torch.multinomial(q, 1, generator=draft_gen))
        target = torch.stack([p, p])
        draft_probs = None if q is None else q[None]
        first = rejection_sample(target, [draft], gen, draft_probs)[0]
        counts[first] += 1
    assert _chi_square(counts, p) < CHI2_CRIT_DF4


def test_rejection_sampler_is_reproducible_with_a_seed():
    p = torch.softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), -1)
    runs = [rejection_sample(p, [1, 2], torch.Generator().manual_seed(7), None) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


def test_greedy_acceptance():
    assert greedy_accept([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all accepted + bonus
    assert greedy_accept([5, 9, 7], [5, 6, 7, 8]) == [5, 6]  # corrected at the first miss
    assert greedy_accept([4], [5, 6]) == [5]
    assert greedy_accept([], [5]) == [5]


def brute_force_continuation(tokens, min_n, max_n, k):
    """The latest earlier match of the longest matching suffix, by nested loops; its copy
    runs on into the tokens it copied (a repeat with period p continues past the end)."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[len(tokens) - n :]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                extended = list(tokens)
                for i in range(k):
                    extended.append(extended[start + n + i])
                return extended[len(tokens) :]
    return []


def test_prompt_lookup_finds_the_latest_match():
    def lookup(tokens, k):
        return SuffixIndex(2, 3).continuation(tokens, k)

    tokens = [1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 1, 2, 3]
    assert lookup(tokens, 2) == [5, 7]  # the latest "1 2 3" came before 5 7
    assert lookup(tokens, 10) == [5, 7, 1, 2, 3, 5, 7, 1, 2, 3]  # the repeat goes on
    assert lookup([4, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]  # period 2 continues past the end
    assert lookup([1, 2, 3], 4) == []
    assert lookup(tokens, 0) == []


@pytest.mark.parametrize("seed", range(8))
def test_prompt_lookup_finds_what_a_brute_force_scan_finds(seed):
    rng = random.Random(seed)
    min_n, max_n = rng.randint(1, 3), rng.randint(3, 5)
    tokens = [rng.randint(0, 5) for _ in range(rng.randint(0, 12))]
    index = SuffixIndex(min_n, max_n)  # what the proposer keeps per request
    for _ in range(150):  # a step appends 1 + accepted drafts; a lookup follows
        tokens += [rng.randint(0, 5) for _ in range(rng.choice([1, 1, 2, 5]))]
        k = rng.randint(0, 8)
        assert index.continuation(tokens, k) == brute_force_continuation(tokens, min_n, max_n, k)
    # Handed a sequence that is not the one it indexed (shorter), it starts again.
    shorter = tokens[: len(tokens) // 2]
    assert index.continuation(shorter, 4) == brute_force_continuation(shorter, min_n, max_n, 4)


def test_the_ngram_proposer_keeps_an_index_per_request_until_released():
    proposer = NgramProposer(2, 3)
    a = Request("a", [1, 2, 3, 9, 1, 2], SamplingParams(max_tokens=8))
    b = Request("b", [5, 6, 5, 6], SamplingParams(max_tokens=8))
    assert proposer.propose([a, b], [2, 2]) == [[3, 9], [5, 6]]
    a.all_token_ids += [3, 7, 1, 2]  # the index extends by what the steps appended
    assert proposer.propose([a], [3]) == [[3, 7, 1]]
    proposer.release(["a", "b"])
    assert not proposer._indexes


def test_controller_allocates_to_likely_drafts_and_turns_off_when_costly():
    gains = [draft_gains([0.9, 0.9, 0.9], 3), draft_gains([0.2, 0.2, 0.2], 3)]
    assert ranked(gains)[:4] == [0, 0, 0, 1]  # the likely request's drafts first
    # Extra tokens nearly free: every draft is worth it.
    assert choose_drafts(gains, lambda c: 1.0 + 0.001 * sum(c)) == [3, 3]
    # Each extra token costs as much as a whole step: none is.
    assert choose_drafts(gains, lambda c: 1.0 + 1.0 * sum(c)) == [0, 0]
    # In between, only the likely drafts.
    assert choose_drafts(gains, lambda c: 1.0 + 0.3 * sum(c)) == [3, 0]


def test_speculative_config_is_validated():
    spec = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 3}')
    assert spec.max_drafts == 3 and not spec.is_auto
    assert parse_speculative_config({"model": "x.gguf"}).method == "draft"
    for bad, words in [
        ("{", "not valid JSON"),
        ({"method": "medusa"}, "method"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min"),
        ({"method": "draft"}, "model"),
        ({"speculative_tokens": 3}, "unknown"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_speculative_config(bad)


# ---- the engine ------------------------------------------------------------------------------


def _with_spec(base: LLM, spec: dict | None, **scheduler) -> LLM:
    cfg = base.engine.config
    cfg = dataclasses.replace(
        cfg,
        speculative_config=spec,
        scheduler=dataclasses.replace(cfg.scheduler, **scheduler),
    )
    return LLM.from_engine(engine_sharing_weights(base.engine, cfg))


@pytest.fixture(scope="module")
def grounded_prompts(llm_fp32) -> list[list[int]]:
    """Prompts that ask the model to repeat a text: drafts from prompt lookup get accepted."""
    with open(ngram.__file__) as f:
        text = f.read()
    tok = llm_fp32.get_tokenizer()
    out = []
    for start in (0, 900, 1700, 2100):
        body = text[start : start + 400]
        messages = [{"role": "user", "content": "Copy this text exactly:\n\n" + body}]
        out.append(tok.apply_chat_template(messages, add_generation_prompt=True))
    return out


GREEDY = SamplingParams(max_tokens=32, temperature=0)


@pytest.fixture(scope="module")
def greedy_reference(llm_fp32, grounded_prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm_fp32.generate(grounded_prompts, GREEDY)]


@pytest.mark.parametrize("k", [1, 4, "auto"])
def test_greedy_output_equals_no_speculation_in_float32(
    llm_fp32, grounded_prompts, greedy_reference, k
):
    spec = _with_spec(llm_fp32, {"method": "ngram", "num_speculative_tokens": k})
    got = [o.outputs[0].token_ids for o in spec.generate(grounded_prompts, GREEDY)]
    assert got == greedy_reference
    counters = spec.engine.stats().spec
    assert counters.num_draft_tokens > 0 and counters.num_accepted_tokens > 0
    assert spec.engine.kv_manager.pool.num_used_blocks == 0  # drafts' blocks all returned


def test_stops_logprobs_and_max_tokens_stay_exact(llm_fp32, grounded_prompts):
    params = [
        SamplingParams(max_tokens=7, temperature=0, logprobs=2),
        SamplingParams(max_tokens=24, temperature=0, stop=["def "]),
        SamplingParams(max_tokens=20, temperature=0, min_tokens=16),
    ]
    prompts = grounded_prompts[:3]
    ref = llm_fp32.generate(prompts, params)
    spec = _with_spec(llm_fp32, {"method": "ngram", "num_speculative_tokens": 4})
    got = spec.generate(prompts, params)
    for r, g in zip(ref, got, strict=True):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        assert g.outputs[0].text == r.outputs[0].text
        assert g.outputs[0].finish_reason == r.outputs[0].finish_reason
    ref_lp, got_lp = ref[0].outputs[0].logprobs, got[0].outputs[0].logprobs
    assert len(got_lp) == len(ref_lp) == 7
    for a, b in zip(ref_lp, got_lp, strict=True):
        assert a.keys() == b.keys()
        for tid in a:
            assert a[tid].logprob == pytest.approx(b[tid].logprob, abs=1e-3)


def test_seeded_sampling_with_speculation_is_reproducible(llm_fp32, grounded_prompts):
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=11)
    spec = _with_spec(llm_fp32, {"method": "ngram", "num_speculative_tokens": 4})
    first = spec.generate(grounded_prompts[:2], params)
    second = spec.generate(grounded_prompts[:2], params)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]


def test_bfloat16_fused_verify_differs_only_at_near_ties(grounded_prompts):
    """In bfloat16 the fused CPU decode layer verifies drafts (k + 1 rows per request); a
    different summation order may flip a near-tie, nothing more."""
    base = LLM(dtype="bfloat16", kv_cache_memory_gib=0.25)
    spec = _with_spec(base, {"method": "ngram", "num_speculative_tokens": 4})
    ref = [o.outputs[0].token_ids for o in base.generate(grounded_prompts, GREEDY)]
    got = [o.outputs[0].token_ids for o in spec.generate(grounded_prompts, GREEDY)]
    assert spec.engine.stats().spec.num_accepted_tokens > 0
    for prompt, r, g in zip(grounded_prompts, ref, got, strict=True):
        diff = next((i for i, (a, b) in enumerate(zip(r, g, strict=False)) if a != b), None)
        if diff is None:
            assert r == g
            continue
        scored = SamplingParams(max_tokens=1, temperature=0, logprobs=2)
        top = base.generate([prompt + r[:diff]], scored)[0].outputs[0].logprobs[0]
        first, second = sorted((lp.logprob for lp in top.values()), reverse=True)[:2]
        assert first - second < 0.1, f"differs at {diff} with a top-2 gap of {first - second}"


def test_guard_turns_speculation_off_where_it_measured_slower():
    from tokenmill.spec.guard import EXPLORE, ThroughputGuard

    guard = ThroughputGuard()
    assert not guard.allows(8)  # first measure without
    guard.record(8, False, tokens=8, seconds=0.1)
    assert guard.allows(8)  # then with
    guard.record(8, True, tokens=12, seconds=0.2)  # slower per request: 7.5 vs 10 tokens/s
    choices = [guard.allows(8) for _ in range(2 * EXPLORE)]
    assert choices.count(True) == 2  # only the exploring steps speculate
    assert not guard.allows(100) and guard.rate.get((7, True)) is None  # buckets apart
    guard.record(1, False, 1, 0.02)
    guard.record(1, True, 3, 0.03)  # batch 1: speculation measured faster
    assert sum(guard.allows(1) for _ in range(EXPLORE)) == EXPLORE - 1


def test_a_predicted_gain_inside_the_models_error_drafts_nothing():
    from tokenmill.spec.controller import MIN_GAIN

    gains = [[0.5]] * 10  # ten requests, one draft each worth half a token
    # Each draft costs a little under its half token's time: all ten together gain ~1%.
    price = (1 - MIN_GAIN) * 0.5 / 10
    assert choose_drafts(gains, lambda c: 1.0 + price * sum(c)) == [0] * 10
    assert sum(choose_drafts(gains, lambda c: 1.0 + price / 10 * sum(c))) == 10


def test_guard_compares_arms_relative_to_the_plain_step_of_their_own_batch():
    from tokenmill.spec.guard import EXPLORE, ThroughputGuard

    guard = ThroughputGuard()  # batch 40 and 62 share a bucket; a plain step: 60 and 100 ms
    guard.record(62, False, tokens=62, seconds=0.100, plain_seconds=0.100)
    guard.record(40, True, tokens=42, seconds=0.066, plain_seconds=0.060)  # 5% more, 10% slower
    assert sum(guard.allows(50) for _ in range(EXPLORE)) == 1  # only the exploring step
