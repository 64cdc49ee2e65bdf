"""One engine step in its one order, for the served engine and the planner's simulator alike.

    schedule -> take_expired -> execute -> update_from_output
        -> host.finish_step (the engine: outputs, stop strings; the simulator: its records)
        -> the step's seconds on the host's clock -> host.account_step, trace
        -> the predictor and the drafter observe the step -> drafts for the next step

LLMEngine hosts it with the model runner and the wall clock; plan/simulate.py with a SimRunner
and the runner's virtual clock, so a simulated step is the served one by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from tokenmill.engine.interfaces import BaseRunner, RunnerOutput, SchedulerOutput
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.slo_predictor import StepTimePredictor
from tokenmill.perf.step_cost import BatchShape, request_shapes
from tokenmill.perf.trace import StepRecord

OutT = TypeVar("OutT", covariant=True)


class BaseStepHost(Protocol[OutT]):
    """What the caller of the step does with it."""

    def finish_step(
        self,
        sched_out: SchedulerOutput,
        runner_out: RunnerOutput | None,
        expired: list[Request],
        updated: list[Request],
    ) -> OutT:
        """The step's results, before its duration is taken. `runner_out` None: nothing was
        scheduled (only `expired`, queued requests ended because their TTFT became
        unattainable, may have ended). `updated`: what update_from_output returned."""
        ...

    def account_step(
        self, sched_out: SchedulerOutput, runner_out: RunnerOutput, seconds: float
    ) -> None:
        """A step that ran, with its duration on the host's clock (counters, metrics)."""
        ...


class BaseDrafter(Protocol):
    """Speculative decoding's side of the step (spec.decoder.SpecDecoder, or the simulator's
    placeholder drafts)."""

    def observe(
        self, sched_out: SchedulerOutput, runner_out: RunnerOutput, wall_s: float
    ) -> None: ...

    def propose(self, running: list[Request]) -> None:
        """Set `spec_token_ids` of the running requests that decode next."""
        ...

    def before_schedule(self) -> None:
        """Just before the next step is scheduled (requests that arrived since `propose` are
        queued): revise the drafts against them."""
        ...


class StepCore(Generic[OutT]):
    """Owns the order of a step. `execute` runs a scheduled step (default: the runner's; the
    engine's isolates faults); `clock` measures the step (the wall clock, or a simulated one);
    `trace`: the list each step's StepRecord is appended to (None: none recorded)."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: BaseRunner,
        host: BaseStepHost[OutT],
        clock: Callable[[], float],
        execute: Callable[[SchedulerOutput], RunnerOutput] | None = None,
        predictor: StepTimePredictor | None = None,
        drafter: BaseDrafter | None = None,
        trace: list[StepRecord] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.host = host
        self.clock = clock
        self.execute = execute or runner.execute
        self.predictor = predictor
        self.drafter = drafter
        self.trace = trace

    def step(self) -> OutT:
        start = self.clock()
        scheduler = self.scheduler
        if self.drafter is not None:
            self.drafter.before_schedule()
        sched_out = scheduler.schedule()
        expired = scheduler.take_expired()  # ended unserved: their TTFT became unattainable
        if sched_out.is_empty:
            if sched_out.finished_req_ids:
                self.runner.execute(sched_out)  # lets the runner drop finished state
            result = self.host.finish_step(sched_out, None, expired, [])
            if self.drafter is not None:
                self.drafter.propose(scheduler.running)  # releases what ended
            return result
        runner_out = self.execute(sched_out)
        updated = scheduler.update_from_output(sched_out, runner_out)
        result = self.host.finish_step(sched_out, runner_out, expired, updated)
        # The whole step (schedule, forward, sampling, the host's part): what the planner models.
        seconds = self.clock() - start
        self.host.account_step(sched_out, runner_out, seconds)
        if self.predictor is not None:  # corrected by the measured step
            self.predictor.observe(BatchShape.from_requests(request_shapes(sched_out)), seconds)
        if self.trace is not None:
            self.trace.append(StepRecord.from_scheduler_output(sched_out, seconds))
        if self.drafter is not None:
            self.drafter.observe(sched_out, runner_out, seconds)
            self.drafter.propose(scheduler.running)  # drafts for the next step
        return result
