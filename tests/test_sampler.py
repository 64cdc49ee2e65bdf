"""The sampler as a pure function of logits: filters, penalties, seeds and logprobs."""

from __future__ import annotations

import math
from collections import Counter

import torch

from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.sampler import SamplingRow, batch_token_logprobs, sample

VOCAB = 8
LOGITS = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0])


def draw(params: SamplingParams, n: int = 400, logits=LOGITS, output_ids=(), seed=0) -> Counter:
    gen = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    for _ in range(n):
        row = SamplingRow(params, gen, [], list(output_ids))
        tokens, _ = sample(logits.clone()[None], [row], [[]])
        counts[tokens[0]] += 1
    return counts


def test_greedy_takes_the_argmax():
    assert draw(SamplingParams(temperature=0), n=5) == Counter({0: 5})


def test_top_k_limits_the_support():
    counts = draw(SamplingParams(temperature=1.0, top_k=3))
    assert set(counts) == {0, 1, 2}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.softmax(LOGITS, 0)
    # The first two tokens hold 0.39 + 0.24 = 0.63: top_p=0.6 keeps exactly those two.
    assert probs[0] < 0.6 < probs[0] + probs[1]
    counts = draw(SamplingParams(temperature=1.0, top_p=0.6))
    assert set(counts) == {0, 1}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.softmax(LOGITS, 0)
    keep = {i for i in range(VOCAB) if probs[i] >= 0.3 * probs[0]}
    counts = draw(SamplingParams(temperature=1.0, min_p=0.3))
    assert set(counts) == keep


def test_sampling_follows_the_distribution():
    counts = draw(SamplingParams(temperature=1.0), n=4000)
    probs = torch.softmax(LOGITS, 0)
    for token in range(3):
        assert abs(counts[token] / 4000 - float(probs[token])) < 0.03


def test_same_seed_same_tokens_other_seed_other_tokens():
    p = SamplingParams(temperature=1.0)
    assert draw(p, n=50, seed=3) == draw(p, n=50, seed=3)
    a = [
        sample(
            LOGITS.clone()[None], [SamplingRow(p, torch.Generator().manual_seed(s), [], [])], [[]]
        )[0][0]
        for s in range(20)
    ]  # noqa: E501
    assert len(set(a)) > 2


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    row = SamplingRow(
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, temperature=0),
        None, prompt_token_ids=[2], output_token_ids=[0, 0, 1],
    )  # fmt: skip
    # Replicate the sampler's in-place processing to read the penalised logits.
    from tokenmill.worker.sampler import _apply_penalties

    penalised = logits.clone()
    _apply_penalties(penalised, [row])
    # token 0: seen twice in output: 2.0 / 2 - 0.5 * 2 - 0.25 = -0.25
    # token 1: seen once: -1.0 * 2 - 0.5 - 0.25 = -2.75
    # token 2: prompt only: repetition only: 0.5 / 2 = 0.25
    # token 3: unseen: 0.0
    assert torch.allclose(penalised, torch.tensor([[-0.25, -2.75, 0.25, 0.0]]))


def test_forbidden_ids_are_never_sampled():
    gen = torch.Generator().manual_seed(0)
    row = SamplingRow(SamplingParams(temperature=0), gen, [], [])
    tokens, _ = sample(LOGITS.clone()[None], [row], [[0, 1]])
    assert tokens == [2]


def test_logprobs_ranks_and_top_n():
    row = SamplingRow(SamplingParams(temperature=0, logprobs=2), None, [], [])
    tokens, lps = sample(LOGITS.clone()[None], [row], [[]])
    lp = lps[0]
    expected = torch.log_softmax(LOGITS, 0)
    assert lp.token_id == 0 and lp.rank == 1
    assert math.isclose(lp.logprob, float(expected[0]), rel_tol=1e-6)
    assert lp.top_ids == [0, 1]
    batch = batch_token_logprobs(LOGITS[None].repeat(2, 1), torch.tensor([3, 7]), 1)
    assert [b.rank for b in batch] == [4, 8]
    assert batch[0].top_ids == [0]


def test_extreme_temperature_and_penalty_stay_finite():
    # A temperature this small samples greedily; a huge penalty cannot make NaN logits.
    assert draw(SamplingParams(temperature=1e-40), n=3) == Counter({0: 3})
    params = SamplingParams(temperature=1.0, repetition_penalty=1e-300)
    counts = draw(params, n=50, output_ids=[1, 2])
    assert sum(counts.values()) == 50 and all(0 <= t < VOCAB for t in counts)


def test_nan_logits_never_win_in_any_kind_of_row():
    # One batch: a plain greedy row, a sampled row and a greedy row with logprobs, each with
    # NaN at a token that would otherwise lead: none picks it, nor the -inf (impossible) one.
    logits = torch.tensor([[0.0, 5.0, 2.0, float("-inf")]]).repeat(3, 1)
    logits[:, 1] = float("nan")
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=0.0, logprobs=2),
    ]
    gen = torch.Generator().manual_seed(0)
    rows = [SamplingRow(p, gen if p.temperature else None, [0], []) for p in params]
    tokens, _ = sample(logits.clone(), rows, [[], [], []])
    assert tokens[0] == 2 and tokens[2] == 2 and tokens[1] in (0, 2)
