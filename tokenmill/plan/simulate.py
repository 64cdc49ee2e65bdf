"""The simulation driver: the engine's own step (engine/step_core.py) on a virtual clock.

    while work remains:
        send requests whose time has come (and, with a concurrency limit, a free slot):
            scheduler.admit (latency promises: may refuse) -> scheduler.add_request
        idle? jump the clock to the next send time
        StepCore.step: schedule -> take_expired -> SimRunner.execute (clock += step time)
            -> update -> this driver stamps every new token and finished (or refused) request
            with the clock -> the predictor observes the step -> [placeholder drafts]

With `SimConfig.slo` and a `slo_policy`, the Scheduler is built as the engine builds it: with a
StepTimePredictor, here over the SimRunner's own step model (plan/sim_runner.py), and the virtual
clock. Prompt token ids are synthetic and distinct per request (no spurious prefix-cache hits); a
request's clock starts when it is sent, as a benchmark client measures it.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenmill.config import SchedulerConfig
from tokenmill.engine.interfaces import RunnerOutput, SchedulerOutput
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.slo_predictor import StepTimePredictor
from tokenmill.engine.step_core import StepCore
from tokenmill.errors import ConfigError, SloUnattainableError
from tokenmill.perf.trace import ScheduleMismatch, StepRecord, first_schedule_mismatch
from tokenmill.plan.sim_runner import (
    PLACEHOLDER_TOKEN,
    ReplayStepTime,
    SimRunner,
    SpecDecodeConfig,
)
from tokenmill.sampling_params import SamplingParams
from tokenmill.workload.slo import SLO
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
    # Latency promises, made as the engine makes them: the targets every request carries (None:
    # best effort) under `scheduler.slo_policy` (off: no admission control, plain FCFS).
    slo: SLO | None = None


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
    # Why the engine refused it (ttft, tpot, capacity: at once) or ended it unserved from the
    # queue (ttft_expired); finish_s is then when the client heard. None: served.
    refused_reason: str | None = None

    @property
    def is_refused(self) -> bool:
        return self.refused_reason is not None


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
    sim = _Simulation(workload, runner, config, until)
    sim.run()
    return SimResult(
        records=list(sim.records.values()),
        duration_s=runner.now,
        num_steps=runner.num_steps,
        prefill_time_s=runner.prefill_time_s,
        decode_time_s=runner.decode_time_s,
        num_preemptions=sim.scheduler.num_preemptions,
        trace=sim.trace,
    )


def _predictor(runner: SimRunner, config: SimConfig) -> StepTimePredictor | None:
    """The engine's step-time predictor over the runner's own step model: the simulated policy
    is the engine's with a predictor that is exact but for jitter (and drafting)."""
    if config.scheduler.slo_policy == "off":
        return None
    model = runner.step_model()
    if model is None:
        raise SimulationError("latency promises need a step-time model; a replayed trace has none")
    return StepTimePredictor(model)


class _Simulation:
    """One run: the client side (sends, concurrency slots) around the engine's step."""

    def __init__(
        self, workload: Workload, runner: SimRunner, config: SimConfig, until: int | None
    ) -> None:
        self.runner, self.config = runner, config
        kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.predictor = _predictor(runner, config)
        self.scheduler = Scheduler(
            config.scheduler, kv, config.max_model_len, self.predictor, lambda: runner.now
        )
        spec = config.spec
        self.trace: list[StepRecord] = []
        self.core = StepCore(
            self.scheduler, runner, self, lambda: runner.now, predictor=self.predictor,
            drafter=PlaceholderDrafter(spec.num_draft_tokens) if spec is not None else None,
            trace=self.trace if config.record_trace else None,
        )  # fmt: skip
        self.pending = deque(enumerate(workload.requests))
        self.records: dict[str, RequestRecord] = {}
        self.limit = workload.max_concurrency
        # When each free client slot became free: a request is sent at max(its arrival, that).
        self.free_slots = deque([0.0] * (self.limit or 0))
        self.num_counted = workload.num_requests if until is None else until
        self.num_left = min(self.num_counted, workload.num_requests)

    def run(self) -> None:
        scheduler, runner = self.scheduler, self.runner
        while self.num_left and (self.pending or scheduler.has_unfinished()):
            self._send_due()
            if not scheduler.has_unfinished():
                if self.pending:  # idle: jump to the next send (none left when all were refused)
                    runner.now = max(runner.now, self.pending[0][1].arrival_s)
                continue
            self.core.step()
            if runner.num_steps > self.config.max_steps:
                raise SimulationError(f"simulation passed {self.config.max_steps} steps")

    def _send_due(self) -> None:
        pending, slots = self.pending, self.free_slots
        while pending and pending[0][1].arrival_s <= self.runner.now and (not self.limit or slots):
            idx, wreq = pending.popleft()
            sent = max(wreq.arrival_s, slots.popleft() if self.limit else 0.0)
            self.records[str(idx)] = self._send(idx, wreq, sent)

    def _send(self, idx: int, wreq: WorkloadRequest, sent: float) -> RequestRecord:
        """The engine's add_request: admission (which may refuse), then the queue."""
        params = SamplingParams(max_tokens=wreq.output_len, ignore_eos=True)
        prompt = synthetic_prompt(idx, wreq.prompt_len)
        request = Request(str(idx), prompt, params, arrival_time=sent, slo=self.config.slo)
        record = RequestRecord(str(idx), wreq.prompt_len, wreq.output_len, sent)
        try:
            self.scheduler.admit([request])
        except SloUnattainableError as err:
            self._end(record, err.reason)  # the client hears at once (a 429)
            return record
        self.scheduler.add_request(request)
        return record

    def finish_step(
        self,
        sched_out: SchedulerOutput,
        runner_out: RunnerOutput | None,
        expired: list[Request],
        updated: list[Request],
    ) -> None:
        """The client's side of a step: stamp tokens and ends with the clock."""
        for request in expired:
            self._end(self.records[request.request_id], "ttft_expired")
        if runner_out is None and not expired:
            scheduler = self.scheduler
            raise SimulationError(
                f"the scheduler made no progress with {scheduler.num_waiting} waiting and "
                f"{scheduler.num_running} running requests: the KV cache "
                f"({self.config.num_blocks} blocks of {self.config.block_size}) is too small"
            )
        now = self.runner.now
        for request in updated:
            rec = self.records[request.request_id]
            rec.token_event_s.append(now)
            if rec.first_token_s is None:
                rec.first_token_s = now
            if request.is_finished:
                rec.num_preemptions = request.num_preemptions
                self._end(rec)

    def account_step(
        self, sched_out: SchedulerOutput, runner_out: RunnerOutput, seconds: float
    ) -> None:
        pass  # the SimRunner counts steps and their times

    def _end(self, rec: RequestRecord, refused_reason: str | None = None) -> None:
        rec.finish_s = self.runner.now
        rec.refused_reason = refused_reason
        self.num_left -= int(rec.req_id) < self.num_counted
        if self.limit:
            self.free_slots.append(self.runner.now)


def replay_schedule(
    workload: Workload, engine_trace: Sequence[StepRecord], config: SimConfig
) -> ScheduleMismatch | None:
    """Run `workload` on the engine's own recorded step times and compare the scheduling
    decisions with `engine_trace` step by step (request ids matched by first appearance).
    None: the simulator made exactly the engine's decisions."""
    runner = SimRunner(ReplayStepTime(engine_trace))
    result = simulate(workload, runner, dataclasses.replace(config, record_trace=True))
    return first_schedule_mismatch(engine_trace, result.trace, rename_ids=True)


class PlaceholderDrafter:
    """The simulated engine's drafter: every decoding request gets up to k placeholder drafts,
    never past its max_tokens; the SimRunner draws how many are accepted."""

    def __init__(self, num_draft_tokens: int) -> None:
        self.num_draft_tokens = num_draft_tokens

    def observe(self, sched_out: SchedulerOutput, runner_out: RunnerOutput, wall_s: float) -> None:
        pass  # acceptance is the SimRunner's draw, not learned

    def before_schedule(self) -> None:
        pass  # a fixed k: drafts are not revised

    def propose(self, running: list[Request]) -> None:
        for request in running:
            decoding = request.num_computed_tokens == request.num_tokens - 1
            remaining = request.sampling_params.max_tokens - request.num_output_tokens
            if decoding and request.num_output_tokens and remaining > 1:
                request.spec_token_ids = [PLACEHOLDER_TOKEN] * min(
                    self.num_draft_tokens, remaining - 1
                )
