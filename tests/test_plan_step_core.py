"""The served engine and the planner's simulator run one step (engine/step_core.py): the same
StepCore object type drives both, and an LLMEngine on a SimRunner makes the simulator's
decisions step for step."""

from tokenmill.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenmill.engine.interfaces import SchedulerOutput
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.step_core import StepCore
from tokenmill.perf.trace import first_schedule_mismatch
from tokenmill.plan.sim_runner import ConstantStepTime, SimRunner, SpecDecodeConfig
from tokenmill.plan.simulate import PlaceholderDrafter, SimConfig, _Simulation, simulate
from tokenmill.sampling_params import SamplingParams
from tokenmill.workload import build_workload

DT = 0.01
SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=48)
BLOCK_SIZE = 4


def _workload():
    return build_workload("random:in=40,out=12,range=0.8", 16, seed=5)  # all sent at t = 0


def _sim_runner(num_blocks: int) -> SimRunner:
    runner = SimRunner(ConstantStepTime(DT))
    runner.num_blocks = num_blocks  # what an engine reads of its runner
    return runner


def _engine_trace(workload, num_blocks: int):
    cfg = EngineConfig(
        cache=CacheConfig(
            block_size=BLOCK_SIZE, num_blocks=num_blocks, enable_prefix_caching=False
        ),
        scheduler=SCHED,
        record_step_trace=True,
    )
    engine = LLMEngine(cfg, _sim_runner(num_blocks))
    for i, w in enumerate(workload.requests):
        prompt = [1000 * i + j for j in range(w.prompt_len)]
        engine.add_request(
            f"cmpl-{i}", prompt, SamplingParams(max_tokens=w.output_len, ignore_eos=True)
        )
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    return engine, outputs


def test_the_engine_and_the_simulator_step_through_one_step_core():
    workload = _workload()
    engine, _ = _engine_trace(workload, 200)
    config = SimConfig(
        200, 256, block_size=BLOCK_SIZE, scheduler=SCHED, spec=SpecDecodeConfig(3, 0.5)
    )
    sim = _Simulation(workload, _sim_runner(200), config, None)
    assert type(engine.core) is type(sim.core) is StepCore
    assert engine.core.host is engine and sim.core.host is sim
    assert engine.core.scheduler is engine.scheduler and sim.core.scheduler is sim.scheduler
    assert isinstance(sim.core.drafter, PlaceholderDrafter)
    assert engine.core.trace is engine.step_trace  # recorded by the core, read by the engine
    sim.run()
    assert all(r.finish_s is not None for r in sim.records.values())


def test_an_engine_on_a_sim_runner_makes_the_simulators_decisions():
    for num_blocks in (24, 200):  # 24 blocks of 4 forces preemptions
        workload = _workload()
        engine, outputs = _engine_trace(workload, num_blocks)
        config = SimConfig(
            num_blocks,
            engine.max_model_len,
            block_size=BLOCK_SIZE,
            scheduler=SCHED,
            record_trace=True,
        )
        result = simulate(workload, _sim_runner(num_blocks), config)
        assert first_schedule_mismatch(engine.step_trace, result.trace, rename_ids=True) is None
        assert result.num_preemptions == engine.scheduler.num_preemptions
        assert (result.num_preemptions > 0) == (num_blocks == 24)
        assert sum(o.finished for o in outputs) == workload.num_requests
        assert engine.stats().num_model_steps == result.num_steps


def test_a_step_with_nothing_scheduled_passes_no_simulated_time():
    runner = _sim_runner(8)
    out = runner.execute(SchedulerOutput(scheduled=[], new_requests=[], finished_req_ids=["a"]))
    assert out.sampled == {} and runner.now == 0.0 and runner.num_steps == 0
