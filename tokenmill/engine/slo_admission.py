"""Admission control for latency promises: a request is promised its SLO only if, by the
step-time predictor, it and every request already promised still meet their targets with it.

The model behind every decision is the scheduler's own step, seen as a fluid:

    step = [ one decode token per running request | a prompt chunk of k tokens ]
    k    = the largest chunk whose predicted step time stays within the tightest TPOT promised
           (the whole token budget when no TPOT is promised)

Prompts are served earliest deadline first, k tokens a step, so the j-th pending prompt (by
TTFT deadline) gets its first token after ceil(prompt tokens up to j / k) steps. A candidate
is admissible when every request whose deadline is not earlier than its own (those it delays)
still finishes its prompt by its deadline, k stays >= 1 with it decoding too (TPOT), and a
sequence slot and KV blocks for its prompt are free (capacity).

What happens to one that is not, per `slo_policy`:
    reject       refused at once: SloUnattainableError, the server's 429 with Retry-After
    queue        waits unpromised while its TTFT can still be met, refused at once otherwise,
                 and expired (finished with reason slo_unattainable) once it no longer can
    best-effort  served without a promise (best effort class)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenmill.config import SchedulerConfig
from tokenmill.engine.slo_predictor import StepTimePredictor
from tokenmill.engine.slo_stats import SloStats
from tokenmill.errors import SloUnattainableError
from tokenmill.perf.step_cost import RequestShape

if TYPE_CHECKING:
    from tokenmill.engine.request import Request
    from tokenmill.engine.scheduler import Scheduler

MIN_PROMPT_CHUNK = 16  # prompt tokens a step still gets when decodes alone exceed their TPOT


@dataclass(frozen=True)
class AdmissionDecision:
    is_admissible: bool
    reason: str = ""  # what cannot be met: ttft | tpot | capacity
    retry_after_s: float = 0.0  # when it might be admissible


def in_prefill(request: Request) -> bool:
    """More than one token to compute: a prompt (or a recompute after preemption) is pending."""
    return request.num_tokens - request.num_computed_tokens > 1


def decode_shapes(requests: list[Request]) -> list[RequestShape]:
    return [RequestShape(1, r.num_tokens - 1) for r in requests]


class SloController:
    def __init__(
        self,
        config: SchedulerConfig,
        predictor: StepTimePredictor,
        clock: Callable[[], float],
        stats: SloStats,
    ) -> None:
        self.policy = config.slo_policy
        self.by_priority = config.policy == "priority"
        self.max_priority_preemptions = config.max_priority_preemptions
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        self.predictor = predictor
        self.clock = clock
        self.stats = stats

    # ---- the fluid model ---------------------------------------------------------------

    def prompt_capacity(self, decodes: list[RequestShape], tpot_cap: float | None):
        """(k, step seconds): the largest prompt chunk that keeps the predicted step within
        `tpot_cap` beside `decodes`, and that step's predicted time. k = 0: decodes alone
        exceed the cap."""
        predict = self.predictor.predict_shapes
        limit = self.max_num_batched_tokens - len(decodes)
        if limit <= 0:
            return 0, predict(decodes)
        if tpot_cap is None:
            return limit, predict([*decodes, RequestShape(limit, 0, 0)])
        if predict([*decodes, RequestShape(1, 0, 0)]) > tpot_cap:
            return 0, predict(decodes)
        lo, hi = 1, limit  # predicted time grows with the chunk: bisect for the largest that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if predict([*decodes, RequestShape(mid, 0, 0)]) <= tpot_cap:
                lo = mid
            else:
                hi = mid - 1
        return lo, predict([*decodes, RequestShape(lo, 0, 0)])

    def prompt_time(self, num_tokens: int, decodes: list[RequestShape], k: int, step_s: float):
        """Predicted time to compute `num_tokens` prompt tokens k a step beside `decodes`."""
        num_full, rest = divmod(num_tokens, k)
        last = self.predictor.predict_shapes([*decodes, RequestShape(rest, 0, 0)]) if rest else 0
        return num_full * step_s + last

    @staticmethod
    def tpot_cap(requests: list[Request]) -> float | None:
        caps = [r.slo.tpot_s for r in requests if not r.is_best_effort and r.slo.tpot_s]
        return min(caps, default=None)

    def prompt_budget(self, running: list[Request]) -> float:
        """Prompt tokens this step may compute so that the decodes promised a TPOT stay in it."""
        promised = [r for r in running if r.is_promised]
        cap = self.tpot_cap(promised)
        if cap is None:
            return math.inf
        decoding = [r for r in running if not in_prefill(r)]
        k, _ = self.prompt_capacity(decode_shapes(decoding), cap)
        return max(k, MIN_PROMPT_CHUNK)

    # ---- classes and priority preemption ------------------------------------------------

    def class_rank(self, request: Request) -> tuple[int, bool]:
        """Smaller = more important: the priority (under the priority policy), then promises
        before best effort."""
        return (request.priority if self.by_priority else 0, request.is_best_effort)

    def is_displaceable(self, request: Request, rank: tuple[int, bool]) -> bool:
        """A running request that a request of class `rank` may preempt: of a lower class and
        preempted fewer than max_priority_preemptions times (the bound against thrash)."""
        return (
            self.class_rank(request) > rank
            and request.num_preemptions < self.max_priority_preemptions
        )

    def priority_victims(self, scheduler: Scheduler, request: Request) -> list[Request]:
        """The running requests to preempt so that `request` fits (a sequence slot, its prompt's
        blocks, TPOT), least important first; none when preempting all it may would not do."""
        rank = self.class_rank(request)
        kept = list(scheduler.running)
        victims: list[Request] = []
        free = scheduler.kv.num_free_blocks
        need = -(-(request.num_tokens - request.num_computed_tokens) // scheduler.kv.block_size)
        while not self._fits(kept, request, free >= need):
            movable = [r for r in kept if self.is_displaceable(r, rank)]
            if not movable:
                return []
            victim = max(movable, key=lambda r: (self.class_rank(r), r.sort_key))
            kept.remove(victim)
            victims.append(victim)
            free += len(scheduler.kv.block_ids(victim.request_id))
        return victims

    def _fits(self, running: list[Request], request: Request, has_blocks: bool) -> bool:
        if len(running) >= self.max_num_seqs or not has_blocks:
            return False
        cap = self.tpot_cap([r for r in running if r.is_promised] + [request])
        return self.prompt_capacity(decode_shapes([*running, request]), cap)[0] >= 1

    # ---- decisions ---------------------------------------------------------------------

    def check(self, scheduler: Scheduler, candidates: list[Request]) -> AdmissionDecision:
        """Can `candidates` (one request, or the n samples of one) be promised now?"""
        rank = min(self.class_rank(r) for r in candidates)
        running = [r for r in scheduler.running if not self.is_displaceable(r, rank)]
        promised_waiting = [r for r in scheduler.waiting if r.is_promised]
        everyone = [*running, *promised_waiting, *candidates]
        cap = self.tpot_cap([r for r in everyone if r.is_promised or r in candidates])
        decodes = decode_shapes(everyone)
        k, step_s = self.prompt_capacity(decodes, cap)
        slots = len(running) + len(promised_waiting) + len(candidates) > self.max_num_seqs
        if slots or not self._blocks_fit(scheduler, [*promised_waiting, *candidates]):
            return AdmissionDecision(
                False, "capacity", self._time_to_free_seat(everyone, candidates)
            )
        if k < 1:
            return AdmissionDecision(False, "tpot", self._time_to_free_seat(everyone, candidates))
        return self._check_ttft(everyone, candidates, decodes, k, step_s)

    def _check_ttft(
        self,
        everyone: list[Request],
        candidates: list[Request],
        decodes: list[RequestShape],
        k: int,
        step_s: float,
    ) -> AdmissionDecision:
        now = self.clock()
        pending = sorted((r for r in everyone if in_prefill(r)), key=lambda r: r.deadline)
        first_deadline = min(r.deadline for r in candidates)
        tokens = others = 0
        for r in pending:
            num = r.num_tokens - r.num_computed_tokens
            tokens += num
            others += 0 if r in candidates else num
            if r.deadline < first_deadline or math.isinf(r.deadline):
                continue  # not delayed by the candidates / no first-token promise
            finish = now + self.prompt_time(tokens, decodes, k, step_s)
            finish_without = now + self.prompt_time(others, decodes, k, step_s)
            if finish > r.deadline and (r in candidates or finish_without <= r.deadline):
                backlog = sum(q.num_tokens - q.num_computed_tokens for q in pending)
                backlog -= sum(q.num_tokens - q.num_computed_tokens for q in candidates)
                retry_s = self.prompt_time(backlog, decodes, k, step_s)
                return AdmissionDecision(False, "ttft", retry_s)
        return AdmissionDecision(True)

    def _blocks_fit(self, scheduler: Scheduler, waiting: list[Request]) -> bool:
        block_size = scheduler.kv.block_size
        need = sum(-(-(r.num_tokens - r.num_computed_tokens) // block_size) for r in waiting)
        return need <= scheduler.kv.num_free_blocks

    def _time_to_free_seat(self, everyone: list[Request], candidates: list[Request]) -> float:
        """Predicted time until the admitted request closest to its max_tokens ends: its
        remaining prompt in one step, then one step per token, everyone decoding."""
        left = [
            r.sampling_params.max_tokens - r.num_output_tokens + in_prefill(r)
            for r in everyone
            if r.sampling_params.max_tokens is not None and r not in candidates
        ]
        if not left:
            return 1.0
        return min(left) * self.predictor.predict_shapes(decode_shapes(everyone))

    def can_still_meet_ttft(self, scheduler: Scheduler, request: Request, delay_s: float) -> bool:
        """Could it meet its TTFT if it started after `delay_s`, its prompt alone then?"""
        if request.slo.ttft_s is None or request.first_token_time is not None:
            return True
        cap = self.tpot_cap([*scheduler.running, request])
        decodes = decode_shapes([r for r in scheduler.running if not in_prefill(r)])
        k, step_s = self.prompt_capacity(decodes, cap)
        if k < 1:
            return False
        num_tokens = request.num_tokens - request.num_computed_tokens
        prompt_s = self.prompt_time(num_tokens, decodes, k, step_s)
        return self.clock() + delay_s + prompt_s <= request.deadline

    # ---- the policy ----------------------------------------------------------------------

    def on_add(self, scheduler: Scheduler, candidates: list[Request]) -> None:
        """Promise, queue, demote or refuse (SloUnattainableError) a new request's samples."""
        if all(r.is_best_effort for r in candidates):
            return
        decision = self.check(scheduler, candidates)
        if decision.is_admissible:
            for r in candidates:
                r.is_promised = True
        elif self.policy == "best-effort":
            for r in candidates:
                r.is_best_effort = True
        elif self.policy == "queue" and all(
            self.can_still_meet_ttft(scheduler, r, decision.retry_after_s) for r in candidates
        ):
            return
        else:
            self.stats.record_refused(decision.reason, len(candidates))
            retry = max(1.0, math.ceil(decision.retry_after_s))
            raise SloUnattainableError(
                f"its {decision.reason} target cannot be met now; retry in {retry:g} s",
                retry,
                decision.reason,
            )

    def review_waiting(self, scheduler: Scheduler) -> list[Request]:
        """Each step: promise queued requests that fit now (earliest deadline first, stopping at
        the first that does not), and return those whose TTFT can no longer be met."""
        expired, blocked = [], False
        for r in list(scheduler.waiting):
            if r.is_best_effort or r.is_promised:
                continue
            delay = 0.0  # past the first that does not fit: only its own prompt is sure
            if not blocked:
                decision = self.check(scheduler, [r])
                if decision.is_admissible:
                    r.is_promised = True
                    continue
                blocked, delay = True, decision.retry_after_s
            if not self.can_still_meet_ttft(scheduler, r, delay):
                expired.append(r)
        if expired:
            self.stats.record_refused("ttft_expired", len(expired))
        return expired

    def may_start(self, scheduler: Scheduler, request: Request) -> bool:
        """Whether a waiting request may join the batch this step: a promise may; a request
        waiting for one may not; best effort may when every promised TPOT still holds."""
        if request.is_promised:
            return True
        if not request.is_best_effort:
            return False
        everyone = [*scheduler.running, request]
        cap = self.tpot_cap([r for r in scheduler.running if r.is_promised])
        return cap is None or self.prompt_capacity(decode_shapes(everyone), cap)[0] >= 1
