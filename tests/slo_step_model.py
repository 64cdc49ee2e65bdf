"""A scheduler with latency promises on a step model that is exactly right, for the tests of
`engine/slo_admission.py` and of the planner's simulation of it.

The step-time model is 16 ms + 1 ms per computed token, in units of 1/1024 s so that every sum
is exact; `run_step` plays the runner: it advances the scheduler's clock by that same cost, so
the predictor is right and every decision follows from arithmetic on the model.
`ContextStepModel` adds 1/128 ms per (query, key) pair of attention, so that a chunk costs more
the more context it attends to, as on real hardware.
"""

from __future__ import annotations

from tokenmill.config import SchedulerConfig
from tokenmill.engine.interfaces import RunnerOutput
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.slo_predictor import BaseStepModel, LinearStepModel, StepTimePredictor
from tokenmill.perf.step_cost import BatchShape, request_shapes
from tokenmill.sampling_params import SamplingParams
from tokenmill.workload.slo import SLO

MS = 1 / 1024  # the model's unit: exact in binary
STEP, TOKEN = 16 * MS, 1 * MS
PAIR = MS / 128  # ContextStepModel's cost of one (query, key) pair
BS = 4
MAX_MODEL_LEN = 512


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def step_model() -> LinearStepModel:
    return LinearStepModel(STEP, TOKEN)


class ContextStepModel:
    """16 ms + 1 ms per computed token + 1/128 ms per (query, key) pair."""

    def seconds(self, batch: BatchShape) -> float:
        return STEP + TOKEN * batch.num_tokens + PAIR * batch.num_attn_pairs


def make(policy="reject", budget=64, max_seqs=8, num_blocks=256, order="fcfs", model=None, **kw):
    clock = Clock()
    cfg = SchedulerConfig(
        max_num_seqs=max_seqs, max_num_batched_tokens=budget, policy=order,
        slo_policy=policy, **{"slo_tpot_share": 1.0, "slo_ttft_share": 1.0, **kw},
    )  # fmt: skip
    predictor = StepTimePredictor(model or step_model())
    sched = Scheduler(cfg, KVCacheManager(num_blocks, BS), MAX_MODEL_LEN, predictor, clock)
    return sched, clock


def req(name, prompt_len, ttft=None, tpot=None, max_tokens=4, priority=0, arrival=0.0, tokens=None):
    slo = SLO(ttft_s=ttft, tpot_s=tpot)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    tokens = tokens or [hash(name) % 1000 + i for i in range(prompt_len)]
    return Request(name, tokens, params, arrival_time=arrival, priority=priority, slo=slo)


def add(sched, request):
    sched.admit([request])
    sched.add_request(request)
    return request


def run_step(sched, clock, slowdown=1.0, model: BaseStepModel | None = None, observe=False):
    """One step of the runner: it takes what the model (default: the linear one) says, times
    `slowdown`; with `observe`, the predictor is corrected by it as the engine does. Returns the
    step as (req_id, tokens)."""
    out = sched.schedule()
    if out.scheduled:
        shape = BatchShape.from_requests(request_shapes(out))
        seconds = (model or step_model()).seconds(shape) * slowdown
        clock.now += seconds
        if observe:
            sched.slo.predictor.observe(shape, seconds)
    sampled = {s.req_id: [7] for s in out.scheduled if s.do_sample}
    sched.update_from_output(out, RunnerOutput(sampled=sampled))
    sched.kv.check_invariants()
    return [(s.req_id, len(s.token_ids)) for s in out.scheduled]
