"""Admission control for latency promises: a request is promised its SLO only if, by the
step-time predictor, it and every request already promised still meet their targets with it.

The model behind every decision is the scheduler's own step, seen as a fluid:

    step = [ one decode token per request, as in the costliest step they can form from now on
             (slo_horizon.py: each request leaves after its max_tokens) | k prompt tokens ]
    k    = the whole token budget when its step stays within the tightest TPOT promised (or
           none is promised); else the banked chunk (slo_budget.py): the chunk a step carries
           after w decode-only steps banked time for it, w chosen for the most prompt tokens
           per planned TPOT, predicted at the most context a chunk can have (the longest
           pending prompt)
    a step is charged its predicted time when nothing cuts k, else the whole cycle: w + 1
           planned TPOTs (each decode-only step banks what it leaves of one, and the chunk's
           step spends it)

Each bound is one a real step cannot pass with an exact predictor, so the model is right by
construction, not by a margin. Prompts are served in the scheduler's order (running prompts,
then waiting ones earliest deadline first), k tokens a step (or cycle), and a prompt's last
step is a full one (the prompts behind it fill it): the j-th pending prompt gets its first
token after ceil(prompt tokens up to j / k) steps (or cycles). A candidate is admissible when
every request it delays still finishes its prompt by its planned deadline (arrival +
slo_ttft_share of its TTFT), k stays >= 1 with it decoding too (TPOT), and a sequence slot and
KV blocks for its prompt are free (capacity). The scheduler sizes each real
chunk by the same predictor at the chunk's own context, within what the decoding requests'
own TPOTs allow that step (`slo_budget`): never less time than the fluid model's step, and
it waits for a banked chunk on the same rule (its own decodes are no costlier than the worst
batch's, so its cycles carry no fewer tokens). Where the machine is slower than predicted, the
scheduler stops waiting when waits bank nothing, and a prompt about to pass its planned first
token may spend the slack between the decodes' TPOT plans and their targets (`slo_budget`).

What happens to one that is not, per `slo_policy`:
    reject       refused at once: SloUnattainableError, the server's 429 with Retry-After
    queue        waits unpromised while its TTFT can still be met, refused at once otherwise,
                 and expired (finished with reason slo_unattainable) once it no longer can
    best-effort  served without a promise (best effort class)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenmill.config import SchedulerConfig
from tokenmill.engine.slo_budget import (
    PendingPrompts,
    PromptBudget,
    banked_chunk,
    step_allowance,
    target_allowance,
)
from tokenmill.engine.slo_horizon import final_decode_shapes, in_prefill, worst_decode_batch
from tokenmill.engine.slo_predictor import StepTimePredictor
from tokenmill.engine.slo_stats import SloStats
from tokenmill.errors import SloUnattainableError
from tokenmill.perf.step_cost import RequestShape

if TYPE_CHECKING:
    from tokenmill.engine.request import Request
    from tokenmill.engine.scheduler import Scheduler


NO_WAIT_STEPS = 4  # steps that serve what fits, after a decode-only wait that banked nothing


@dataclass(frozen=True)
class AdmissionDecision:
    is_admissible: bool
    reason: str = ""  # what cannot be met: ttft | tpot | capacity
    retry_after_s: float = 0.0  # when it might be admissible


def chunk_context(requests: list[Request]) -> int:
    """The context the fluid model's chunk is predicted at: the longest pending prompt, more
    than any chunk of any of them attends to, alone or split across prompts in one step."""
    return max((r.num_tokens for r in requests if in_prefill(r)), default=0)


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
        self.tpot_share = config.slo_tpot_share
        self.ttft_share = config.slo_ttft_share
        self.predictor = predictor
        self.clock = clock
        self.stats = stats
        self._last_budget: PromptBudget | None = None  # the previous step's, to see it banked
        self._no_wait_steps = -1  # steps left without waiting, after a wait that banked nothing

    # ---- the fluid model ---------------------------------------------------------------

    def prompt_capacity(
        self, decodes: list[RequestShape], tpot_cap: float | None, num_context: int = 0
    ) -> tuple[int, float]:
        """(k, step seconds) of the fluid model: the prompt chunk, after `num_context` tokens,
        that a step beside `decodes` carries, and what that is charged. Without a cut, the
        whole token budget and its predicted step; when `tpot_cap` cuts it, the banked chunk
        (slo_budget.banked_chunk: after w decode-only steps) and its cycle, (w + 1) caps.
        k = 0: nothing fits beside the decodes, waiting or not."""
        predict = self.predictor.predict_shapes

        @functools.cache  # banked_chunk's searches ask for the same sizes again
        def step_s(n: int) -> float:
            return predict([*decodes, RequestShape(n, num_context)])

        limit = self.max_num_batched_tokens - len(decodes)
        if limit <= 0:
            return 0, predict(decodes)
        if tpot_cap is None or step_s(limit) <= tpot_cap:
            return limit, step_s(limit)
        chunk, waits = banked_chunk(step_s, predict(decodes), tpot_cap, limit)
        if chunk == 0:
            return 0, predict(decodes)
        return chunk, (waits + 1) * tpot_cap

    def worst_batch(self, requests: list[Request]) -> list[RequestShape]:
        """The decodes of the costliest step `requests` can form from now on (slo_horizon.py)."""
        return worst_decode_batch(requests, self.predictor.predict_shapes)

    @staticmethod
    def prompt_time(num_tokens: int, k: int, step_s: float) -> float:
        """Predicted time to compute `num_tokens` prompt tokens, k a step. The last step is a
        full one: the prompts behind fill it (and when none does, it is shorter)."""
        return -(-num_tokens // k) * step_s

    def planned_first_token_by(self, request: Request) -> float:
        """When admission plans a request's first token: arrival + slo_ttft_share of its TTFT
        (inf once it has one, for best effort, or without a TTFT target)."""
        ttft = request.slo.ttft_s
        if request.is_best_effort or request.first_token_time is not None or ttft is None:
            return math.inf
        return request.arrival_time + ttft * self.ttft_share

    def tpot_cap(self, requests: list[Request]) -> float | None:
        """The step time planned for: the tightest TPOT promised, times slo_tpot_share."""
        caps = [r.slo.tpot_s for r in requests if not r.is_best_effort and r.slo.tpot_s]
        return min(caps) * self.tpot_share if caps else None

    def prompt_budget(self, running: list[Request], waiting: list[Request]) -> PromptBudget | None:
        """This step's prompt chunks, sized so that every promised decoding request keeps its
        mean gap within its planned TPOT (engine/slo_budget.py); None: no TPOT to keep."""
        now = self.clock()
        decoding = [r for r in running if not in_prefill(r)]
        allowance, tightest = step_allowance(decoding, self.tpot_share, now)
        last, self._last_budget = self._last_budget, None
        if allowance == math.inf:
            return None
        if last is not None and not last.banked(allowance):
            self._no_wait_steps = NO_WAIT_STEPS
        self._no_wait_steps = max(self._no_wait_steps - 1, -1)
        prompts = self._service_order(running, [r for r in waiting if r.is_promised])
        self._last_budget = PromptBudget(
            self.predictor, decoding, allowance, tightest,
            PendingPrompts.of(prompts, self.planned_first_token_by),
            self.max_num_batched_tokens - len(decoding),
            now=now, target_cap=target_allowance(decoding, now), may_bank=self._no_wait_steps < 0,
        )  # fmt: skip
        return self._last_budget

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
        everyone = [*running, request]
        return (
            self.prompt_capacity(self.worst_batch(everyone), cap, chunk_context(everyone))[0] >= 1
        )

    # ---- decisions ---------------------------------------------------------------------

    def check(self, scheduler: Scheduler, candidates: list[Request]) -> AdmissionDecision:
        """Can `candidates` (one request, or the n samples of one) be promised now?"""
        rank = min(self.class_rank(r) for r in candidates)
        running = [r for r in scheduler.running if not self.is_displaceable(r, rank)]
        promised_waiting = [r for r in scheduler.waiting if r.is_promised]
        everyone = [*running, *promised_waiting, *candidates]
        cap = self.tpot_cap([r for r in everyone if r.is_promised or r in candidates])
        k, step_s = self.prompt_capacity(self.worst_batch(everyone), cap, chunk_context(everyone))
        slots = len(running) + len(promised_waiting) + len(candidates) > self.max_num_seqs
        if slots or not self._blocks_fit(scheduler, [*promised_waiting, *candidates]):
            return AdmissionDecision(
                False, "capacity", self._time_to_free_seat(everyone, candidates)
            )
        if k < 1:
            return AdmissionDecision(False, "tpot", self._time_to_free_seat(everyone, candidates))
        pending = self._service_order(running, [*promised_waiting, *candidates])
        return self._check_ttft(pending, candidates, k, step_s)

    def _service_order(self, running: list[Request], waiting: list[Request]) -> list[Request]:
        """Pending prompts in the order the scheduler serves them: the running ones, then the
        waiting ones, each earliest deadline first."""

        def key(r: Request) -> tuple:
            return r.deadline_key(self.by_priority)

        return [
            *sorted((r for r in running if in_prefill(r)), key=key),
            *sorted((r for r in waiting if in_prefill(r)), key=key),
        ]

    def _check_ttft(
        self, pending: list[Request], candidates: list[Request], k: int, step_s: float
    ) -> AdmissionDecision:
        now = self.clock()
        tokens = others = 0
        is_delayed = False  # served after a candidate
        for r in pending:
            num = r.num_tokens - r.num_computed_tokens
            tokens += num
            others += 0 if r in candidates else num
            is_delayed = is_delayed or r in candidates
            deadline = self.planned_first_token_by(r)
            if not is_delayed or math.isinf(deadline):
                continue  # not delayed by the candidates / no first-token promise
            finish = now + self.prompt_time(tokens, k, step_s)
            finish_without = now + self.prompt_time(others, k, step_s)
            if r in candidates:
                r.predicted_first_token_time = finish
            if finish > deadline and (r in candidates or finish_without <= deadline):
                backlog = sum(q.num_tokens - q.num_computed_tokens for q in pending)
                backlog -= sum(q.num_tokens - q.num_computed_tokens for q in candidates)
                return AdmissionDecision(False, "ttft", self.prompt_time(backlog, k, step_s))
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
        return min(left) * self.predictor.predict_shapes(final_decode_shapes(everyone))

    def can_still_meet_ttft(self, scheduler: Scheduler, request: Request, delay_s: float) -> bool:
        """Could it meet its TTFT if it started after `delay_s`, its prompt alone then?"""
        if request.slo.ttft_s is None or request.first_token_time is not None:
            return True
        cap = self.tpot_cap([*scheduler.running, request])
        decodes = final_decode_shapes([r for r in scheduler.running if not in_prefill(r)])
        k, step_s = self.prompt_capacity(decodes, cap, request.num_tokens)
        if k < 1:
            return False
        num_tokens = request.num_tokens - request.num_computed_tokens
        prompt_s = self.prompt_time(num_tokens, k, step_s)
        return self.clock() + delay_s + prompt_s <= self.planned_first_token_by(request)

    # ---- the policy ----------------------------------------------------------------------

    def on_add(self, scheduler: Scheduler, candidates: list[Request]) -> None:
        """Promise, queue, demote or refuse (SloUnattainableError) a new request's samples."""
        if all(r.is_best_effort for r in candidates):
            return
        decision = self.check(scheduler, candidates)
        if decision.is_admissible:
            for r in candidates:
                r.is_promised = True
        elif self.policy == "best-effort" or self._base_admits_when_idle(scheduler, candidates):
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

    def _base_admits_when_idle(self, scheduler: Scheduler, candidates: list[Request]) -> bool:
        """An idle engine serves, without a promise, what only the learned correction refuses:
        alone, it delays no one, and its steps re-measure the machine. (A correction learned
        while another process held the cores would otherwise refuse everything for good: no
        step would run to correct it.)"""
        if scheduler.running or scheduler.waiting:
            return False
        with self.predictor.uncorrected():
            return self.check(scheduler, candidates).is_admissible

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
        if cap is None:
            return True
        return (
            self.prompt_capacity(self.worst_batch(everyone), cap, chunk_context(everyone))[0] >= 1
        )
