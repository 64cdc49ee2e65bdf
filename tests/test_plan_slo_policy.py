"""The planner runs the engine's latency promises: its simulation builds the Scheduler with a
step-time predictor over the SimRunner's own step model, admits through `scheduler.admit`, and
counts refused requests as missing the SLO.

On the constant-cost step model of tests/slo_step_model.py (16 ms + 1 ms per computed token, in
units of 1/1024 s) the predictor is exact, so every decision is arithmetic on the model.
"""

from __future__ import annotations

import re

import pytest

from tests.slo_step_model import (
    BS,
    MAX_MODEL_LEN,
    ContextStepModel,
    add,
    make,
    req,
    run_step,
    step_model,
)
from tokenmill.cli.main import main
from tokenmill.config import SchedulerConfig
from tokenmill.errors import SloUnattainableError
from tokenmill.plan.metrics import summarize
from tokenmill.plan.planner import PlanRequest, build_sample
from tokenmill.plan.search import size
from tokenmill.plan.sim_runner import CostModelStepTime, SimRunner
from tokenmill.plan.simulate import SimConfig, simulate, synthetic_prompt
from tokenmill.workload import ArrivalSpec, build_workload
from tokenmill.workload.slo import SLO, parse_slo

NUM_BLOCKS = 256
# About twice what the model serves: 8 seats, a 40-token prompt and 16 tokens each.
OVERLOAD = build_workload("fixed:in=40,out=16", 120, ArrivalSpec(rate=30.0), seed=1)


def _sim(policy: str, slo: SLO, workload=OVERLOAD, model=None):
    scheduler = SchedulerConfig(
        max_num_seqs=8,
        max_num_batched_tokens=64,
        slo_policy=policy,
        slo_tpot_share=1.0,
        slo_ttft_share=1.0,
    )
    config = SimConfig(
        NUM_BLOCKS, MAX_MODEL_LEN, BS, scheduler, enable_prefix_caching=True,
        record_trace=True, slo=slo,
    )  # fmt: skip
    return simulate(workload, SimRunner(CostModelStepTime(model or step_model())), config)


def test_reject_refuses_above_capacity_and_keeps_every_promise():
    slo = SLO(ttft_s=0.5, tpot_s=0.1)
    rejected = summarize(_sim("reject", slo), slo)
    served_all = summarize(_sim("off", slo), slo)
    # Off admits everything: the queue grows and nearly every request misses its TTFT.
    assert served_all.num_refused == 0 and served_all.slo_attainment < 0.1
    # Reject refuses what the predictor says cannot be met, and meets every promise it makes.
    assert 0.2 < rejected.refused_share < 0.8
    assert rejected.slo_attainment_admitted == 1.0
    assert rejected.slo_attainment == pytest.approx(1 - rejected.refused_share)
    assert rejected.ttft.p99 <= 0.5 and rejected.tpot.p99 <= 0.1
    assert rejected.goodput_req_s > 10 * served_all.goodput_req_s
    assert rejected.goodput_tok_s == pytest.approx(16 * rejected.goodput_req_s)
    assert not rejected.meets_slo  # a refused request is a missed one


@pytest.mark.parametrize(
    ("spec", "rate", "slo", "model"),
    [
        ("fixed:in=40,out=16", 20.0, SLO(ttft_s=0.25), None),  # missed 4 of 115 (a short last step)
        ("fixed:in=40,out=16", 30.0, SLO(ttft_s=0.25, tpot_s=0.05), None),
        ("fixed:in=100,out=24", 8.0, SLO(ttft_s=0.5, tpot_s=0.06), ContextStepModel()),
        ("fixed:in=200,out=24", 8.0, SLO(ttft_s=2.0, tpot_s=0.1), ContextStepModel()),
    ],
)
def test_with_an_exact_predictor_every_admitted_request_meets_its_slo(spec, rate, slo, model):
    workload = build_workload(spec, 120, ArrivalSpec(rate=rate), seed=1)
    result = summarize(_sim("reject", slo, workload, model), slo)
    assert result.num_refused > 10  # above capacity: the promises bind
    assert result.slo_attainment_admitted == 1.0


def _engine_decisions(policy: str, slo: SLO, workload=OVERLOAD):
    """The engine's scheduler driven by hand on the same clock and step model: (refused id ->
    reason, expired ids, the steps as (req_id, tokens), first token time per request)."""
    sched, clock = make(policy, budget=64, max_seqs=8, num_blocks=NUM_BLOCKS)
    reqs, i, refused, expired, steps, requests = workload.requests, 0, {}, [], [], {}
    while i < len(reqs) or sched.has_unfinished():
        while i < len(reqs) and reqs[i].arrival_s <= clock.now:
            w = reqs[i]
            r = req(
                str(i), w.prompt_len, slo.ttft_s, slo.tpot_s, max_tokens=w.output_len,
                arrival=w.arrival_s, tokens=synthetic_prompt(i, w.prompt_len),
            )  # fmt: skip
            try:
                requests[r.request_id] = add(sched, r)
            except SloUnattainableError as err:
                refused[r.request_id] = err.reason
            i += 1
        if not sched.has_unfinished():
            clock.now = reqs[i].arrival_s if i < len(reqs) else clock.now
            continue
        steps.append(tuple(run_step(sched, clock)))
        expired += [r.request_id for r in sched.take_expired()]
    first = {k: r.first_token_time for k, r in requests.items() if r.first_token_time}
    return refused, expired, [s for s in steps if s], first


@pytest.mark.parametrize("policy", ["reject", "queue", "best-effort"])
def test_simulation_makes_the_engine_schedulers_admission_decisions(policy):
    slo = SLO(ttft_s=0.2, tpot_s=0.05)  # tight: refusals for capacity, TTFT, and expiries
    refused, expired, steps, first = _engine_decisions(policy, slo)
    result = _sim(policy, slo)
    records = {r.req_id: r for r in result.records}
    sim_refused = {k: r.refused_reason for k, r in records.items() if r.is_refused}
    assert {k: v for k, v in sim_refused.items() if v != "ttft_expired"} == refused
    assert sorted(k for k, v in sim_refused.items() if v == "ttft_expired") == sorted(expired)
    assert [rec.scheduled for rec in result.trace] == steps
    assert {k: r.first_token_s for k, r in records.items() if r.first_token_s} == first
    if policy == "reject":
        assert set(refused.values()) == {"capacity", "ttft"}
    if policy == "queue":
        assert len(expired) > 40 and refused
    if policy == "best-effort":
        assert not refused and not expired


def _plan(capsys, *argv, code=0):
    assert main([
        "plan", "--model", "llama-3.1-8b", "--hardware", "l4", "--workload",
        "fixed:in=100,out=10", "--rate", "20", "--num-prompts", "16", "--no-jitter",
        "--max-num-seqs", "16", "--max-num-batched-tokens", "512", *argv,
    ]) == code  # fmt: skip
    out, err = capsys.readouterr()
    return out if code == 0 else err


def test_plan_cli_prints_refused_share_and_goodput_under_a_policy(capsys):
    out = _plan(capsys, "--slo", "ttft=2s,tpot=100ms", "--slo-policy", "reject")
    line = re.search(r"under --slo-policy reject: ([\d.]+)% refused; ([\d.]+)% of admitted", out)
    assert line and 0 < float(line[1]) < 50 and float(line[2]) == 100.0
    goodput = re.search(r"goodput\s+([\d.]+) req/s, ([\d,]+) output tok/s within every", out)
    assert goodput and float(goodput[1]) > 0 and int(goodput[2].replace(",", "")) > 0
    # Without a policy nothing is refused, and the report says nothing of refusals.
    assert "refused" not in _plan(capsys, "--slo", "ttft=2s,tpot=100ms")
    assert "needs --slo" in _plan(capsys, "--slo-policy", "reject", code=2)
    with pytest.raises(SystemExit):  # argparse's choices, config.SLO_POLICIES
        _plan(capsys, "--slo", "ttft=2s", "--slo-policy", "drop")
    assert "invalid choice: 'drop'" in capsys.readouterr().err


def _sized(slo: str):
    request = PlanRequest(
        model="llama-3.1-8b", hardware="l4", workload="fixed:in=100,out=10", rate=20.0,
        num_prompts=16, slo=parse_slo(slo), slo_policy="reject", jitter=False, tp=1,
        max_num_seqs=16, max_num_batched_tokens=512,
    )  # fmt: skip
    return size(request, build_sample(request))


def test_sizing_under_a_policy_buys_replicas_for_a_tighter_slo():
    loose, tight = _sized("ttft=2s,tpot=100ms"), _sized("ttft=120ms,tpot=100ms")
    assert loose.best is not None and tight.best is not None
    num_loose, num_tight = loose.best.placement.replicas, tight.best.placement.replicas
    assert num_tight > 2 * num_loose
    # What the tight SLO pays for is refusals: it met it once the refused share fell within it.
    for sizing in (loose, tight):
        assert sizing.best.metrics.refused_share <= 0.01 and sizing.best.metrics.meets_slo
    assert any(
        r.metrics.num_refused and not r.metrics.meets_slo and r.placement.replicas >= num_loose
        for r in tight.tried
    )
