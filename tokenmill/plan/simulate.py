"""The simulation driver: the engine's step loop on a virtual clock.

    while work remains:
        admit requests whose send time has come (and, with a concurrency limit, a free slot)
        idle? jump the clock to the next send time
        [propose drafts] -> schedule -> SimRunner.execute (clock += step time) -> update
        stamp every new token and finished request with the clock

Prompt token ids are synthetic and distinct per request (no spurious prefix-cache hits); a
request's clock starts when it is sent, as a benchmark client measures it.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenmill.config import SchedulerConfig
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.errors import ConfigError
from tokenmill.perf.trace import ScheduleMismatch, StepRecord, first_schedule_mismatch
from tokenmill.plan.sim_runner import (
    PLACEHOLDER_TOKEN,
    ReplayStepTime,
    SimRunner,
    SpecDecodeConfig,
)
from tokenmill.sampling_params import SamplingParams
from tokenmill.workload.types import Workload, WorkloadRequest

_ID_STRIDE = 1 << 24  # request i's prompt uses token ids [i * stride, i * stride + len)


class SimulationError(ConfigError):
    """The simulated engine cannot make progress (a request does not fit the KV cache)."""


@dataclass(frozen=True)
class SimConfig:
    num_blocks: int
    max_model_len: int
    block_size: int = 16
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    enable_prefix_caching: bool = False  # distinct synthetic prompts never hit; off is faster
    spec: SpecDecodeConfig | None = None
    record_trace: bool = False
    max_steps: int = 50_000_000


@dataclass
class RequestRecord:
    req_id: str
    prompt_len: int
    output_len: int
    sent_s: float  # when the client sent it (arrival, or later behind a concurrency limit)
    first_token_s: float | None = None
    finish_s: float | None = None
    token_event_s: list[float] = field(default_factory=list)  # one per step that gave tokens
    num_preemptions: int = 0


@dataclass
class SimResult:
    records: list[RequestRecord]
    duration_s: float
    num_steps: int
    prefill_time_s: float
    decode_time_s: float
    num_preemptions: int
    trace: list[StepRecord]


def synthetic_prompt(idx: int, length: int) -> list[int]:
    return list(range(idx * _ID_STRIDE, idx * _ID_STRIDE + length))


def _check_fits(workload: Workload, config: SimConfig) -> None:
    longest = workload.max_seq_len
    if longest > config.max_model_len:
        raise SimulationError(
            f"a request of {longest} tokens exceeds the model's context of {config.max_model_len}"
        )
    capacity = config.num_blocks * config.block_size
    if longest > capacity:
        raise SimulationError(
            f"a request of {longest} tokens needs more KV cache than the placement holds "
            f"({capacity:,} tokens): short by {longest - capacity:,} tokens"
        )


def simulate(
    workload: Workload, runner: SimRunner, config: SimConfig, until: int | None = None
) -> SimResult:
    """Run `workload` through the real Scheduler and KVCacheManager on `runner`'s clock; with
    `until`, stop once the first `until` requests (in arrival order) have finished."""
    _check_fits(workload, config)
    kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
    scheduler = Scheduler(config.scheduler, kv, config.max_model_len)
    pending = deque(enumerate(workload.requests))
    records: dict[str, RequestRecord] = {}
    trace: list[StepRecord] = []
    limit = workload.max_concurrency
    # When each free client slot became free: a request is sent at max(its arrival, that).
    free_slots = deque([0.0] * (limit or 0))
    num_left = workload.num_requests if until is None else min(until, workload.num_requests)
    while num_left and (pending or scheduler.has_unfinished()):
        while pending and pending[0][1].arrival_s <= runner.now and (limit is None or free_slots):
            idx, wreq = pending.popleft()
            sent = max(wreq.arrival_s, free_slots.popleft() if limit else 0.0)
            records[str(idx)] = _admit(scheduler, idx, wreq, sent)
        if not scheduler.has_unfinished():
            runner.now = max(runner.now, pending[0][1].arrival_s)
            continue
        if config.spec is not None:
            _propose_drafts(scheduler, config.spec.num_draft_tokens)
        sched_out = scheduler.schedule()
        if sched_out.is_empty:
            raise SimulationError(
                f"the scheduler made no progress with {scheduler.num_waiting} waiting and "
                f"{scheduler.num_running} running requests: the KV cache "
                f"({config.num_blocks} blocks of {config.block_size}) is too small"
            )
        start = runner.now
        runner_out = runner.execute(sched_out)
        if config.record_trace:
            trace.append(StepRecord.from_scheduler_output(sched_out, runner.now - start))
        for request in scheduler.update_from_output(sched_out, runner_out):
            rec = records[request.request_id]
            rec.token_event_s.append(runner.now)
            if rec.first_token_s is None:
                rec.first_token_s = runner.now
            if request.is_finished:
                rec.finish_s = runner.now
                rec.num_preemptions = request.num_preemptions
                num_left -= int(request.request_id) < (until or workload.num_requests)
                if limit:
                    free_slots.append(runner.now)
        if runner.num_steps > config.max_steps:
            raise SimulationError(f"simulation passed {config.max_steps} steps")
    return SimResult(
        records=list(records.values()),
        duration_s=runner.now,
        num_steps=runner.num_steps,
        prefill_time_s=runner.prefill_time_s,
        decode_time_s=runner.decode_time_s,
        num_preemptions=scheduler.num_preemptions,
        trace=trace,
    )


def replay_schedule(
    workload: Workload, engine_trace: Sequence[StepRecord], config: SimConfig
) -> ScheduleMismatch | None:
    """Run `workload` on the engine's own recorded step times and compare the scheduling
    decisions with `engine_trace` step by step (request ids matched by first appearance).
    None: the simulator made exactly the engine's decisions."""
    runner = SimRunner(ReplayStepTime(engine_trace))
    result = simulate(workload, runner, dataclasses.replace(config, record_trace=True))
    return first_schedule_mismatch(engine_trace, result.trace, rename_ids=True)


def _admit(scheduler: Scheduler, idx: int, wreq: WorkloadRequest, sent: float) -> RequestRecord:
    params = SamplingParams(max_tokens=wreq.output_len, ignore_eos=True)
    request = Request(str(idx), synthetic_prompt(idx, wreq.prompt_len), params, arrival_time=sent)
    scheduler.add_request(request)
    return RequestRecord(str(idx), wreq.prompt_len, wreq.output_len, sent)


def _propose_drafts(scheduler: Scheduler, k: int) -> None:
    """Give every decoding request up to k placeholder drafts, never past its max_tokens."""
    for request in scheduler.running:
        decoding = request.num_computed_tokens == request.num_tokens - 1
        remaining = request.sampling_params.max_tokens - request.num_output_tokens
        if decoding and request.num_output_tokens and remaining > 1:
            request.spec_token_ids = [PLACEHOLDER_TOKEN] * min(k, remaining - 1)
