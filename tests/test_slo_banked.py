"""Banked chunks (engine/slo_budget.py): when every step with prompt tokens pays a fixed cost,
a prompt waits through decode-only steps for a chunk that amortises it, and admission promises
exactly the cycles the scheduler then runs.

The step model is tests/slo_step_model.py's (16 ms + 1 ms per computed token, units of 1/1024 s)
plus PROMPT_STEP = 8 ms in any step that computes prompt tokens, as on this CPU under GGUF
weights (BENCHMARKS.md section 11)."""

from __future__ import annotations

import contextlib
import random

import pytest

from tests.slo_step_model import MS, STEP, TOKEN, add, make, req, run_step
from tokenmill.engine.slo_budget import PendingPrompts, banked_chunk, largest_fitting
from tokenmill.engine.slo_horizon import in_prefill
from tokenmill.errors import SloUnattainableError
from tokenmill.perf.step_cost import BatchShape, RequestShape

PROMPT_STEP = 8 * MS


class PromptStepModel:
    def seconds(self, batch: BatchShape) -> float:
        fixed = PROMPT_STEP if batch.num_prefill_tokens else 0.0
        return STEP + TOKEN * batch.num_tokens + fixed


@pytest.mark.parametrize("seed", range(20))
def test_largest_fitting_is_the_brute_force_answer(seed):
    rng = random.Random(seed)
    limit = rng.randint(0, 300)
    costs, total = [], rng.uniform(0, 5)
    for _ in range(limit + 1):  # nondecreasing, with flat runs and jumps
        total += rng.choice([0.0, rng.uniform(0, 1), rng.uniform(0, 20)])
        costs.append(total)
    asked = []

    def step_s(n):
        asked.append(n)
        return costs[n]

    for cap in [rng.uniform(0, total + 5) for _ in range(5)] + [costs[0], total]:
        expected = max((n for n in range(1, limit + 1) if costs[n] <= cap), default=0)
        assert largest_fitting(step_s, cap, limit) == expected
    assert 0 not in asked


def test_a_fixed_cost_per_prompt_step_makes_waiting_carry_more_tokens():
    def step_s(n):  # 4 decodes (20 ms) + the fixed cost + n tokens
        return 28 * MS + n * TOKEN

    # Within one 36 ms TPOT 8 tokens fit; each decode-only step banks 16 ms. After 2 waits a
    # step may take 68 ms: 40 tokens in 3 TPOTs (13.3 a TPOT) beats 8; after 3 it reaches the
    # 72 ms ceiling (2 TPOTs): 44 in 4 (11).
    assert banked_chunk(step_s, 20 * MS, 36 * MS, 60) == (40, 2)
    assert banked_chunk(step_s, 20 * MS, 36 * MS, 8) == (8, 0)  # the budget is what fits now
    assert banked_chunk(step_s, 36 * MS, 36 * MS, 60) == (8, 0)  # nothing to bank

    def linear(n):  # no fixed cost: every wait banks exactly the tokens it did not compute
        return 20 * MS + n * TOKEN

    assert banked_chunk(linear, 20 * MS, 36 * MS, 60) == (16, 0)


def test_a_prompt_waits_for_the_banked_chunk_and_decodes_keep_their_tpot():
    model = PromptStepModel()
    sched, clock = make(model=model)
    for i in range(4):
        add(sched, req(f"d{i}", 8, tpot=36 * MS, max_tokens=50))
    run_step(sched, clock, model=model)
    add(sched, req("p", 60))  # best effort: fills what the TPOT leaves
    steps = [run_step(sched, clock, model=model) for _ in range(5)]
    # Two decode-only steps (20 ms each) bank 32 ms: a 68 ms step carries 40 tokens; the last
    # 20 need 48 ms, one wait more. 8 tokens a step would have taken 8 steps.
    assert [dict(s).get("p", 0) for s in steps] == [0, 0, 40, 0, 20]
    while sched.has_unfinished():
        run_step(sched, clock, model=model)
    assert sched.slo_stats.attained[("tpot", "0")] == 4 and not sched.slo_stats.missed


def test_admission_promises_the_cycles_the_scheduler_runs():
    model = PromptStepModel()
    sched, clock = make(model=model)
    decodes = [RequestShape(1, 8)] * 4
    assert sched.slo.prompt_capacity(decodes, 36 * MS) == (40, 108 * MS)  # 40 tokens a cycle
    for i in range(4):
        add(sched, req(f"d{i}", 8, tpot=36 * MS, max_tokens=50))
    run_step(sched, clock, model=model)
    start = clock.now
    # 60 tokens: two cycles of 3 TPOTs, 216 ms. Charged 8 tokens a 36 ms step, as before
    # banked chunks, it needed 288 ms and a 250 ms TTFT was refused.
    p = add(sched, req("p", 60, ttft=250 * MS, tpot=36 * MS, arrival=start, max_tokens=8))
    assert p.is_promised and p.predicted_first_token_time == start + 216 * MS
    with pytest.raises(SloUnattainableError) as err:  # behind p: 120 tokens, 3 cycles > 250 ms
        add(sched, req("q", 60, ttft=250 * MS, tpot=36 * MS, arrival=start))
    assert err.value.reason == "ttft"
    while sched.has_unfinished():
        run_step(sched, clock, model=model)
    assert p.first_token_time - start <= 216 * MS
    assert sched.slo_stats.num_good_requests == 5 and not sched.slo_stats.missed


class PromptContextModel(PromptStepModel):
    """PromptStepModel with a fixed cost of 24 ms a prompt step, plus 1/128 ms per (query, key)
    pair of attention."""

    def seconds(self, batch: BatchShape) -> float:
        fixed = 2 * PROMPT_STEP if batch.num_prefill_tokens else 0.0
        return super().seconds(batch) + fixed + MS / 128 * batch.num_attn_pairs


@pytest.mark.parametrize("seed", range(3))
def test_under_random_load_every_promise_made_is_kept(seed):
    # Admission charges banked cycles; the scheduler runs them (waits, then one large chunk,
    # prompts in deadline order): no admitted request may miss either target.
    rng, model = random.Random(seed), PromptContextModel()
    sched, clock = make(max_seqs=8, budget=128, model=model, slo_tpot_share=0.9)
    requests, num_waits = [], 0
    for step in range(800):
        if rng.random() < 0.4:
            prompt, out = rng.randint(20, 200), rng.randint(4, 40)
            with contextlib.suppress(SloUnattainableError):
                requests.append(add(sched, req(f"r{step}", prompt, ttft=0.3, tpot=60 * MS,
                                               max_tokens=out, arrival=clock.now)))  # fmt: skip
        if not sched.has_unfinished():
            clock.now += 10 * MS
            continue
        pending = [r for r in sched.running if in_prefill(r)] + list(sched.waiting)
        chunks = [n for _, n in run_step(sched, clock, model=model) if n > 1]
        num_waits += bool(pending) and not chunks
    assert len([r for r in requests if r.is_promised]) > 50 and sched.slo_stats.refused
    assert not sched.slo_stats.missed
    assert num_waits > 0  # decode-only steps while a promised prompt waited for its chunk


class SlowDecodeModel(PromptStepModel):
    """A machine slower than predicted where it matters to waiting: a decode-only step of the
    4 decodes below takes the whole 36 ms TPOT, so a wait banks nothing."""

    def seconds(self, batch: BatchShape) -> float:
        return super().seconds(batch) if batch.num_prefill_tokens else 36 * MS


def test_a_prompt_stops_waiting_when_waits_bank_nothing():
    sched, clock = make(model=PromptStepModel())
    for i in range(4):
        add(sched, req(f"d{i}", 8, tpot=36 * MS, max_tokens=80))
    run_step(sched, clock, model=SlowDecodeModel())
    start = clock.now
    p = add(sched, req("p", 60, ttft=400 * MS, tpot=36 * MS, arrival=start, max_tokens=8))
    assert p.is_promised  # two banked cycles by the prediction: 216 ms
    steps = []
    while p.first_token_time is None:
        steps.append(dict(run_step(sched, clock, model=SlowDecodeModel())).get("p", 0))
    # One wait banks nothing; then NO_WAIT_STEPS steps serve the 8 tokens that fit, one more
    # futile wait, and the rest. Waiting on, it would have starved until the decodes ended
    # (80 steps).
    assert steps[:6] == [0, 8, 8, 8, 8, 0]
    assert p.first_token_time - start <= 400 * MS
    while sched.has_unfinished():
        run_step(sched, clock, model=SlowDecodeModel())
    assert not sched.slo_stats.missed


class SlowPromptModel(PromptStepModel):
    """Steps with prompt tokens take twice the prediction (which is not corrected): banked
    cycles run long."""

    def seconds(self, batch: BatchShape) -> float:
        return super().seconds(batch) * (2.0 if batch.num_prefill_tokens else 1.0)


@pytest.mark.parametrize("late_rule", [True, False])
def test_a_late_prompt_spends_the_targets_slack_and_keeps_every_promise(late_rule, monkeypatch):
    # Plans are 0.8 of the 45 ms TPOT target (36 ms) and of the 900 ms TTFT. The cycles run
    # long and the prompt would pass its planned first token (720 ms); it then gets steps up
    # to what the decodes afford of their 45 ms target itself, without the 2-TPOT ceiling.
    if not late_rule:
        monkeypatch.setattr(PendingPrompts, "is_late", lambda *args: False)
    sched, clock = make(model=PromptStepModel(), slo_tpot_share=0.8, slo_ttft_share=0.8, budget=128)
    for i in range(4):
        add(sched, req(f"d{i}", 8, tpot=45 * MS, max_tokens=60))
    for _ in range(8):
        run_step(sched, clock, model=SlowPromptModel())
    start = clock.now
    p = add(sched, req("p", 200, ttft=900 * MS, tpot=45 * MS, arrival=start, max_tokens=4))
    assert p.predicted_first_token_time - start == 648 * MS  # 5 cycles of 44 tokens
    is_late = []
    while sched.has_unfinished():
        run_step(sched, clock, model=SlowPromptModel())
        is_late.append(sched._prompt_budget.is_late)
    if late_rule:
        assert any(is_late) and p.first_token_time - start <= 900 * MS
        assert not sched.slo_stats.missed  # the decodes' TPOTs too
    else:  # the rule is what keeps it
        assert sched.slo_stats.missed == {("ttft", "0"): 1}
