"""The simulator drives the engine's own scheduler: with a constant step time it must make
exactly the scheduling decisions of an independent reference loop (and, later, of the real
engine's recorded step trace)."""

import pytest

from tokenmill.config import SchedulerConfig
from tokenmill.engine.interfaces import RunnerOutput
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.perf.trace import StepRecord, first_schedule_mismatch
from tokenmill.plan.metrics import summarize
from tokenmill.plan.sim_runner import ConstantStepTime, SimRunner, SpecDecodeConfig
from tokenmill.plan.simulate import SimConfig, SimulationError, replay_schedule, simulate
from tokenmill.sampling_params import SamplingParams
from tokenmill.workload import ArrivalSpec, build_workload
from tokenmill.workload.slo import parse_slo

DT = 0.01
SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=48)


def _workload():
    return build_workload("random:in=40,out=12,range=0.8", 24, ArrivalSpec(rate=40.0), seed=3)


def reference_trace(workload, sched_cfg, num_blocks, block_size, max_model_len, dt):
    """A minimal engine loop written independently of the simulator."""
    scheduler = Scheduler(sched_cfg, KVCacheManager(num_blocks, block_size, False), max_model_len)
    reqs, i, now, trace = workload.requests, 0, 0.0, []
    while i < len(reqs) or scheduler.has_unfinished():
        while i < len(reqs) and reqs[i].arrival_s <= now:
            prompt = [1000 * i + j for j in range(reqs[i].prompt_len)]
            params = SamplingParams(max_tokens=reqs[i].output_len, ignore_eos=True)
            scheduler.add_request(Request(str(i), prompt, params, arrival_time=reqs[i].arrival_s))
            i += 1
        if not scheduler.has_unfinished():
            now = reqs[i].arrival_s
            continue
        out = scheduler.schedule()
        now += dt
        sampled = {s.req_id: [7] for s in out.scheduled if s.do_sample}
        scheduler.update_from_output(out, RunnerOutput(sampled=sampled))
        trace.append(StepRecord.from_scheduler_output(out, dt))
    return trace, scheduler.num_preemptions


@pytest.mark.parametrize("num_blocks", [24, 200])  # 24 blocks of 4 forces preemptions
def test_constant_time_simulation_makes_the_reference_decisions(num_blocks):
    workload = _workload()
    config = SimConfig(num_blocks, 256, block_size=4, scheduler=SCHED, record_trace=True)
    result = simulate(workload, SimRunner(ConstantStepTime(DT)), config)
    expected, preemptions = reference_trace(workload, SCHED, num_blocks, 4, 256, DT)
    assert first_schedule_mismatch(expected, result.trace) is None
    assert result.num_preemptions == preemptions
    assert (preemptions > 0) == (num_blocks == 24)
    assert all(r.finish_s is not None for r in result.records)


def test_replay_against_an_engine_trace_with_its_own_ids():
    """The shape of the check against the real engine: its trace (own request ids, own wall
    times) replayed through the simulator."""
    workload = _workload()
    expected, _ = reference_trace(workload, SCHED, 200, 4, 256, DT)
    engine_trace = [
        StepRecord(**{**r.__dict__, "scheduled": tuple((f"cmpl-{i}", n) for i, n in r.scheduled)})
        for r in expected
    ]
    config = SimConfig(200, 256, block_size=4, scheduler=SCHED)
    assert replay_schedule(workload, engine_trace, config) is None
    assert first_schedule_mismatch(engine_trace, expected) is not None  # ids differ by name
    shifted = [engine_trace[0], *engine_trace[2:]]
    assert replay_schedule(workload, shifted, config) is not None


def test_latency_metrics_of_a_single_request():
    workload = build_workload("fixed:in=100,out=10", 1)
    config = SimConfig(100, 1024, scheduler=SchedulerConfig(max_num_batched_tokens=64))
    result = simulate(workload, SimRunner(ConstantStepTime(DT)), config)
    m = summarize(result, parse_slo("ttft=25ms,tpot=10ms"))
    # prefill in two chunks (64 + 36 tokens) then 9 decode steps
    assert m.ttft.median == pytest.approx(2 * DT)
    assert m.tpot.median == pytest.approx(DT)
    assert m.e2e.median == pytest.approx(11 * DT)
    assert m.itl.mean == pytest.approx(DT)
    assert m.output_tok_s == pytest.approx(10 / (11 * DT))
    assert m.meets_slo is True and m.slo_attainment == 1.0


def test_concurrency_limit_and_send_times():
    workload = build_workload("fixed:in=8,out=4", 6, ArrivalSpec(max_concurrency=2))
    config = SimConfig(100, 1024)
    result = simulate(workload, SimRunner(ConstantStepTime(DT)), config)
    sent = sorted(r.sent_s for r in result.records)
    finish = sorted(r.finish_s for r in result.records)
    assert sent[:2] == [0.0, 0.0]
    # each later request is sent when an earlier one finishes
    assert sent[2:] == pytest.approx(finish[:4])


def test_speculative_decoding_accepts_drafts():
    workload = build_workload("fixed:in=8,out=40", 4)
    config = SimConfig(200, 1024, spec=SpecDecodeConfig(4, 1.0))
    runner = SimRunner(ConstantStepTime(DT), acceptance_rate=1.0)
    result = simulate(workload, runner, config)
    # all drafts accepted: 5 tokens per decode step after the first token
    assert result.num_steps == 1 + 8
    assert all(r.finish_s is not None for r in result.records)


def test_jitter_is_seeded_and_static_hardware_has_none():
    def run(cv, seed):
        w = build_workload("fixed:in=8,out=20", 3)
        return simulate(w, SimRunner(ConstantStepTime(DT), cv, seed), SimConfig(100, 1024))

    assert run(0.1, 1).duration_s == run(0.1, 1).duration_s != run(0.1, 2).duration_s
    assert run(0.0, 1).duration_s == pytest.approx(20 * DT)


def test_request_larger_than_the_kv_cache_is_an_error():
    workload = build_workload("fixed:in=100,out=100", 1)
    with pytest.raises(SimulationError, match="short by 40 tokens"):
        simulate(workload, SimRunner(ConstantStepTime(DT)), SimConfig(10, 4096))
