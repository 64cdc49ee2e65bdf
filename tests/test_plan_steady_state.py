"""Open-loop plans measure the steady state: warm-up and drain left out, every replica with a
full sample of its own, so the answer does not depend on how long the run is or how many
replicas share the load."""

import pytest

from tokenmill.plan.planner import PlanRequest, run_plan


def _plan(**kw):
    base = dict(model="llama-3.1-8b", hardware="h100", workload="fixed:in=100,out=20")
    return run_plan(PlanRequest(**{**base, **kw}))


def test_twice_the_run_length_moves_the_metrics_under_2_percent():
    short, long = (_plan(rate=100, num_prompts=n) for n in (400, 800))
    assert not short.metrics.is_overloaded and not long.metrics.is_overloaded
    for get in (
        lambda r: r.output_tok_s,
        lambda r: r.metrics.tpot.median,
        lambda r: r.metrics.tpot.p90,
        lambda r: r.metrics.ttft.median,
        lambda r: r.metrics.e2e.median,
    ):
        assert get(long) == pytest.approx(get(short), rel=0.02)
    # the run covers warm-up, the measured window and a tail; only the window is measured
    assert short.metrics.num_requests == 400
    assert "400 measured per replica" in short.workload


def test_more_replicas_never_lower_throughput_at_a_fixed_rate():
    results = [
        _plan(workload="fixed:in=200,out=50", rate=200, replicas=r, num_prompts=64)
        for r in (1, 2, 8, 12)
    ]
    throughput = [r.output_tok_s for r in results]
    assert all(b >= a for a, b in zip(throughput, throughput[1:], strict=False)), throughput
    # one replica cannot keep up with 10,000 tok/s; twelve produce what is offered
    assert results[0].metrics.is_overloaded and "OVERLOADED" in " ".join(results[0].notes)
    assert throughput[0] < 0.95 * throughput[-1]
    assert throughput[-1] == pytest.approx(200 * 50)
    # every replica simulates a full sample, however many share the load
    assert min(r.metrics.num_requests for r in results) == 64
