"""The SimRunner: the runner interface with no model behind it. Each step advances a virtual clock
by a step time (from the cost model, a constant, or a recorded trace) and returns placeholder
tokens, so the engine's own Scheduler and KVCacheManager run unchanged.

Requests are created with ignore_eos and max_tokens = the workload's output length, so the
placeholder token (0) never ends a request early: how long each runs comes from the workload.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tokenmill.engine.interfaces import BaseRunner, RunnerOutput, SchedulerOutput
from tokenmill.engine.slo_predictor import BaseStepModel
from tokenmill.errors import ConfigError
from tokenmill.perf.step_cost import BatchShape, RequestShape
from tokenmill.perf.trace import StepRecord
from tokenmill.plan.step_time import LayoutStepTime

PLACEHOLDER_TOKEN = 0
_MEMO_SIZE = 1 << 16  # step times RunnerStepModel remembers


@dataclass(frozen=True)
class StepTiming:
    seconds: float
    prefill_fraction: float  # share of the step's time spent on prompt tokens (for economics)

    @property
    def has_prompt_tokens(self) -> bool:
        return self.prefill_fraction > 0


class BaseStepTimer(Protocol):
    """How long a scheduled step takes. Timers with a model of it also give `batch_seconds`
    (BatchShape -> seconds), which latency promises predict with (`SimRunner.step_model`)."""

    def step_time(self, sched_out: SchedulerOutput) -> StepTiming: ...


def _token_share(sched_out: SchedulerOutput) -> float:
    total = sched_out.num_scheduled_tokens
    return sched_out.num_prefill_tokens / total if total else 0.0


class ConstantStepTime:
    """Every step takes `seconds`: isolates scheduling decisions from the cost model."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def step_time(self, sched_out: SchedulerOutput) -> StepTiming:
        return StepTiming(self.seconds, _token_share(sched_out))

    def batch_seconds(self, batch: BatchShape) -> float:
        return self.seconds


class ReplayStepTime:
    """The wall times of a recorded engine trace, step by step (past its end: the last one)."""

    def __init__(self, records: Sequence[StepRecord]) -> None:
        if not records:
            raise ConfigError("cannot replay an empty step trace")
        self.records = records
        self.idx = 0

    def step_time(self, sched_out: SchedulerOutput) -> StepTiming:
        rec = self.records[min(self.idx, len(self.records) - 1)]
        self.idx += 1
        return StepTiming(rec.wall_time_s, _token_share(sched_out))


@dataclass(frozen=True)
class SpecDecodeConfig:
    """Speculative decoding: k drafts per decode step, each accepted with `acceptance_rate`
    (until the first rejection), or with `per_position[i]` at draft position i where given (the
    engine's measured conditional acceptance, plan/spec_acceptance.py); a draft token costs
    `draft_cost` of a target decode step."""

    num_draft_tokens: int
    acceptance_rate: float
    draft_cost: float = 0.0
    per_position: tuple[float, ...] = ()

    def rate_at(self, position: int) -> float:
        if position < len(self.per_position):
            return self.per_position[position]
        return self.acceptance_rate

    def __post_init__(self) -> None:
        if self.num_draft_tokens < 1:
            raise ConfigError(f"draft length k must be >= 1, got {self.num_draft_tokens}")
        for rate in (self.acceptance_rate, *self.per_position):
            if not 0 <= rate <= 1:
                raise ConfigError(f"acceptance rate must be in [0, 1], got {rate}")
        if self.draft_cost < 0:
            raise ConfigError(f"draft cost must be >= 0, got {self.draft_cost}")


class CostModelStepTime:
    """Step time from the layout's cost model (or any BaseStepModel); prefill and decode parts
    are timed alone too, to split a mixed step's time between them in proportion."""

    def __init__(
        self, model: LayoutStepTime | BaseStepModel, spec: SpecDecodeConfig | None = None
    ) -> None:
        self.model = model
        self.spec = spec

    def batch_seconds(self, batch: BatchShape) -> float:
        """The model's time of `batch`, drafting aside (a BatchShape does not say which
        requests decode; the engine's predictor corrects for it from measured steps)."""
        return self.model.seconds(batch)

    def step_time(self, sched_out: SchedulerOutput) -> StepTiming:
        prefill: list[RequestShape] = []
        decode: list[RequestShape] = []
        for s in sched_out.scheduled:
            (prefill if s.is_prompt_step else decode).append(RequestShape.of(s))
        seconds = self.model.seconds(BatchShape.from_requests(prefill + decode))
        if prefill and decode:
            t_pre = self.model.seconds(BatchShape.from_requests(prefill))
            t_dec = self.model.seconds(BatchShape.from_requests(decode))
            share = t_pre / (t_pre + t_dec)
        else:
            share = 1.0 if prefill else 0.0
        if self.spec is not None and decode:
            # Drafting proposes tokens one at a time for every decoding request.
            one_token = BatchShape.from_requests(
                RequestShape(1, r.num_context_tokens + r.num_new_tokens - 1) for r in decode
            )
            draft = (
                self.spec.num_draft_tokens * self.spec.draft_cost * self.model.seconds(one_token)
            )
            share = share * seconds / (seconds + draft)
            seconds += draft
        return StepTiming(seconds, share)


class SimRunner(BaseRunner):
    """Implements BaseRunner.execute on a virtual clock (`now`, seconds).

    jitter_cv > 0 multiplies each step time by a log-normal factor of mean 1 (dynamically
    scheduled hardware); statically scheduled hardware runs with 0. Seeded: runs repeat exactly.
    decode_time_scale and prompt_time_scale multiply the times of steps without and with prompt
    tokens: a machine measured running slower or faster than its profile, each kind apart
    (decode steps stream the weights and K/V; prompt chunks are bound by compute; on a shared
    machine the two drift differently). decode_per_request_s and decode_per_step_s are added to
    each step without prompt tokens (per scheduled request, and once): work a server does around
    the engine's step, such as streaming each token, measured by the validation's speed probe.
    """

    def __init__(
        self,
        timer: BaseStepTimer,
        jitter_cv: float = 0.0,
        seed: int = 0,
        acceptance_rate: float | SpecDecodeConfig | None = None,
        decode_time_scale: float = 1.0,
        prompt_time_scale: float = 1.0,
        decode_per_request_s: float = 0.0,
        decode_per_step_s: float = 0.0,
    ) -> None:
        self.timer = timer
        self.decode_time_scale = decode_time_scale
        self.prompt_time_scale = prompt_time_scale
        self.decode_per_request_s = decode_per_request_s
        self.decode_per_step_s = decode_per_step_s
        self.now = 0.0
        self.last_step_s = 0.0
        self.prefill_time_s = 0.0
        self.decode_time_s = 0.0
        self.decode_step_time_s = 0.0  # of steps without prompt tokens
        self.num_steps = 0
        self.acceptance_rate = acceptance_rate
        self._rng = random.Random(seed)
        self._sigma = math.sqrt(math.log1p(jitter_cv**2)) if jitter_cv > 0 else 0.0

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        if scheduler_output.is_empty:  # only finished ids to drop: no step runs, no time passes
            return RunnerOutput(sampled={})
        timing = self.timer.step_time(scheduler_output)
        num_reqs = len(scheduler_output.scheduled)
        seconds = self.scaled(timing.seconds, timing.has_prompt_tokens, num_reqs)
        if self._sigma:
            seconds *= math.exp(self._rng.gauss(-(self._sigma**2) / 2, self._sigma))
        if not timing.has_prompt_tokens:
            self.decode_step_time_s += seconds
        self.now += seconds
        self.last_step_s = seconds
        self.num_steps += 1
        self.prefill_time_s += seconds * timing.prefill_fraction
        self.decode_time_s += seconds * (1 - timing.prefill_fraction)
        sampled = {
            s.req_id: [PLACEHOLDER_TOKEN] * (1 + self._num_accepted(len(s.spec_token_ids)))
            for s in scheduler_output.scheduled
            if s.do_sample
        }
        return RunnerOutput(sampled=sampled)

    def scaled(self, seconds: float, has_prompt_tokens: bool, num_reqs: int) -> float:
        """A timer's step time as this machine runs it (before jitter)."""
        if has_prompt_tokens:
            return seconds * self.prompt_time_scale
        return (
            seconds * self.decode_time_scale + self.decode_per_step_s
            + self.decode_per_request_s * num_reqs
        )  # fmt: skip

    def step_model(self) -> RunnerStepModel | None:
        """This runner's own step time as a BaseStepModel (None: its timer has no model)."""
        return RunnerStepModel(self) if hasattr(self.timer, "batch_seconds") else None

    def _num_accepted(self, num_drafts: int) -> int:
        rates = self.acceptance_rate
        if not num_drafts or rates is None:
            return 0
        rate_at = rates.rate_at if isinstance(rates, SpecDecodeConfig) else lambda _: rates
        accepted = 0
        while accepted < num_drafts and self._rng.random() < rate_at(accepted):
            accepted += 1
        return accepted


class RunnerStepModel:
    """A SimRunner's step time of a batch, as `execute` takes it less the jitter: the base of the
    simulated engine's step-time predictor, which is then exact up to jitter and drafting."""

    def __init__(self, runner: SimRunner) -> None:
        self.runner = runner
        # Admission asks about the same batches many times a step (a bisection per decision).
        self._memo: dict[BatchShape, float] = {}

    def seconds(self, batch: BatchShape) -> float:
        seconds = self._memo.get(batch)
        if seconds is None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            base = self.runner.timer.batch_seconds(batch)
            seconds = self.runner.scaled(base, batch.has_prompt_tokens, batch.num_reqs)
            self._memo[batch] = seconds
        return seconds
