"""The scheduler: one token budget per step, shared by decodes, prefill chunks and drafts.

Each step it walks the running requests in service order (priority, then arrival) and grants each
the tokens it still lacks, within the budget; then it admits waiting requests in the same step,
taking prefix-cache hits for free and chunking prompts to what the budget has left. When blocks
run out, the least important running request not yet served this step is preempted by recompute
(blocks freed, computed reset to zero, back to the front of the queue). A request preempted
`max_preemptions_before_protected` times is only chosen when no other can be, so no request
is preempted over and over while others run. While requests wait, a running prompt's chunk is
capped (`long_prefill_token_threshold`, default half the budget) so a long prompt does not hold
new requests back until it ends, and a running prompt chunk always leaves one token per running
decode behind it.

With latency promises on (`slo_policy`, engine/slo_admission.py), requests are ordered earliest
deadline first (no long-prefill share: a running prompt is not cut for later deadlines), each
prompt chunk is capped so the step's predicted time, the chunk at its own context, keeps every
promised decode within its TPOT (prompt chunks shrink, decodes never wait), only promised or
best-effort requests that fit join the batch, and a promised waiting request may preempt
running requests of a lower class (each at most `max_priority_preemptions` times).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tokenmill.config import SchedulerConfig
from tokenmill.engine.interfaces import (
    NewRequestData,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.request_queue import RequestQueue
from tokenmill.engine.slo_admission import SloController, in_prefill
from tokenmill.engine.slo_budget import PromptBudget
from tokenmill.engine.slo_predictor import StepTimePredictor
from tokenmill.engine.slo_stats import SloStats

# The stop_reason of a queued request whose TTFT became unattainable (it ends aborted, unserved).
EXPIRED_STOP_REASON = "slo_unattainable"


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_manager: KVCacheManager,
        max_model_len: int,
        predictor: StepTimePredictor | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        self.kv = kv_manager
        self.max_model_len = max_model_len
        self.clock = clock  # the clock of arrival times and token times (virtual in simulation)
        self.slo_stats = SloStats()
        self.slo: SloController | None = None
        if predictor is not None and config.slo_policy != "off":
            self.slo = SloController(config, predictor, clock, self.slo_stats)
        self.requests: dict[str, Request] = {}
        self.waiting = RequestQueue(config.policy, deadline_first=self.slo is not None)
        self._prompt_budget: PromptBudget | None = None  # this step's chunks under a TPOT
        self._expired: list[Request] = []  # queued requests whose TTFT can no longer be met
        self.running: list[Request] = []
        self._finished_ids: list[str] = []  # to tell the runner at the next step
        self._announced: set[str] = set()  # requests the runner has state for
        self.num_preemptions = 0

    # ---- request lifecycle -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.push(request)

    def admit(self, requests: list[Request]) -> None:
        """Decide the latency promise of a new request's samples before they are added: promised,
        left to wait for one, demoted to best effort, or refused (SloUnattainableError)."""
        if self.slo is not None:
            self.slo.on_add(self, requests)

    def take_expired(self) -> list[Request]:
        """Requests ended since the last call because their TTFT could no longer be met."""
        expired, self._expired = self._expired, []
        return expired

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """End requests in any state (abort, stop string matched, error); frees their blocks."""
        ended = []
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)
            ended.append(request)
        return ended

    def preempt_request(self, request_id: str) -> bool:
        """Preempt a running request by recompute now (its blocks go back to the pool)."""
        request = self.requests.get(request_id)
        if request is None or request.status != RequestStatus.RUNNING:
            return False
        self._preempt(request)
        return True

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    # ---- one step ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        self.kv.begin_step()
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        new_requests: list[NewRequestData] = []
        num_preempted = 0
        self._begin_slo_step()

        # Service order: the most important first; preemption takes from the other end.
        self.running.sort(key=self._service_key)
        idx = 0
        while idx < len(self.running) and budget > 0:
            request = self.running[idx]
            num_new = self._num_tokens_to_schedule(request, budget - self._reserve(idx))
            if num_new <= 0:
                idx += 1
                continue
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self._pick_victim(self.running[idx:])
                self._preempt(victim)
                num_preempted += 1
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted itself; the next request now sits at idx
            scheduled.append(self._make_scheduled(request, num_new, new_requests))
            budget -= num_new
            idx += 1

        # Admit waiting requests, unless this step already had to preempt (memory is short).
        if num_preempted == 0:
            self._admit_waiting(budget, scheduled, new_requests)
        finished, self._finished_ids = self._finished_ids, []
        return self._build_output(scheduled, new_requests, finished)

    def _admit_waiting(
        self, budget: int, scheduled: list[ScheduledRequest], new_requests: list[NewRequestData]
    ) -> None:
        for request in self._waiting_in_order():
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if self.slo is not None and not self.slo.may_start(self, request):
                continue
            computed_blocks, num_hit = [], 0
            if request.num_computed_tokens == 0:
                computed_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = request.num_tokens - request.num_computed_tokens - num_hit
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = self._cap_prompt_chunk(request, min(num_new, budget), num_hit)
            if num_new <= 0:
                break  # this step's prompt tokens are spent
            if self.kv.allocate_slots(request, num_new, computed_blocks) is None:
                break
            self.waiting.remove(request)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.num_computed_tokens += num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._make_scheduled(request, num_new, new_requests))
            budget -= num_new

    def _waiting_in_order(self):
        if self.slo is None:
            # The head until the caller stops (it removes each request it admits).
            while self.waiting:
                yield self.waiting.peek()
        else:
            yield from list(self.waiting)  # requests may be passed over

    # ---- latency promises ------------------------------------------------------------------

    def _service_key(self, request: Request) -> tuple:
        if self.slo is None:
            return request.sort_key
        return request.deadline_key(by_priority=self.config.policy == "priority")

    def _begin_slo_step(self) -> None:
        """Promise or expire queued requests, preempt for a promised one of a higher class, and
        size this step's prompt tokens."""
        self._prompt_budget = None
        if self.slo is None:
            return
        expired = self.slo.review_waiting(self)
        for request in expired:
            self.waiting.remove(request)
            request.stop_reason = EXPIRED_STOP_REASON
            self._finish(request, RequestStatus.FINISHED_ABORTED)
        self._expired.extend(expired)
        head = next((r for r in self.waiting if r.is_promised), None)
        if head is not None:
            for victim in self.slo.priority_victims(self, head):
                self._preempt(victim)
        self._prompt_budget = self.slo.prompt_budget(self.running, list(self.waiting))

    def _cap_prompt_chunk(self, request: Request, num_new: int, num_hit: int = 0) -> int:
        """The prompt tokens that keep this step within the promised TPOT, predicted at the
        chunk's own context (its computed tokens and prefix-cache hit)."""
        if self._prompt_budget is None or num_new <= 0:
            return num_new
        num_context = request.num_computed_tokens + num_hit
        return self._prompt_budget.cap_chunk(request, num_new, num_context)

    def update_from_output(
        self, sched_out: SchedulerOutput, runner_out: RunnerOutput
    ) -> list[Request]:
        """Append sampled tokens and apply the stop rules the scheduler owns: EOS, stop token
        ids, max_tokens, the context limit. Returns the requests that gained tokens or ended."""
        touched: list[Request] = []
        for sched in sched_out.scheduled:
            request = self.requests.get(sched.req_id)
            if request is None or request.is_finished:
                continue
            if sched.req_id in runner_out.failed:
                self._remove_running(request, RequestStatus.FINISHED_ERROR)
                request.stop_reason = runner_out.failed[sched.req_id]
                touched.append(request)
                continue
            tokens = runner_out.sampled.get(sched.req_id)
            if sched.spec_token_ids:
                # Drafts past the accepted ones were computed but are not part of the sequence.
                num_rejected = len(sched.spec_token_ids) + 1 - len(tokens or [None])
                request.num_computed_tokens -= num_rejected
                request.spec_token_ids = []
            if not tokens:
                continue
            now = self.clock()
            if request.first_token_time is None:
                request.first_token_time = now
                self.slo_stats.record_first_token(request)
            request.last_token_time = now
            for token in tokens:
                request.append_output_token(token)
                status = self._check_stop(request, token)
                if status is not None:
                    self._remove_running(request, status)
                    break
            touched.append(request)
        return touched

    # ---- helpers -----------------------------------------------------------------------

    def _num_tokens_to_schedule(self, request: Request, budget: int) -> int:
        num_new = request.num_tokens_with_spec - request.num_computed_tokens
        # Never past the context limit (drafts are trimmed first).
        num_new = min(num_new, self.max_model_len - request.num_computed_tokens)
        if not self.config.enable_chunked_prefill and num_new > budget:
            return 0
        # Under latency promises prompts are served earliest deadline first, as admission
        # predicts: a share of the step for the waiting would hand it to later deadlines.
        is_sharing = self.slo is None and self.waiting
        if is_sharing and len(self.running) < self.config.max_num_seqs and in_prefill(request):
            num_new = min(num_new, self._long_prefill_cap())
        return self._cap_prompt_chunk(request, min(num_new, budget))

    def _reserve(self, idx: int) -> int:
        """Budget a running prompt chunk leaves for the decodes served after it: one token each,
        so a long prompt never stalls the requests already generating."""
        if not in_prefill(self.running[idx]):
            return 0
        return sum(1 for r in self.running[idx + 1 :] if not in_prefill(r))

    def _long_prefill_cap(self) -> int:
        """A running prompt's share of a step while others wait: the rest admits them."""
        threshold = self.config.long_prefill_token_threshold
        if threshold is None:
            threshold = max(1, self.config.max_num_batched_tokens // 2)
        return threshold or self.config.max_num_batched_tokens

    def _make_scheduled(
        self, request: Request, num_new: int, new_requests: list[NewRequestData]
    ) -> ScheduledRequest:
        if request.request_id not in self._announced:
            self._announced.add(request.request_id)
            new_requests.append(
                NewRequestData(
                    request.request_id, list(request.prompt_token_ids), request.sampling_params
                )
            )
        start = request.num_computed_tokens
        end = start + num_new
        if self._prompt_budget is not None:
            self._prompt_budget.take(request, start, num_new)
        known_end = min(end, request.num_tokens)
        token_ids = request.all_token_ids[start:known_end]
        spec = request.spec_token_ids[: end - known_end] if end > request.num_tokens else []
        request.num_computed_tokens = end
        # The runner gets the blocks it has not seen: a diff of the table, never the table.
        table = self.kv.block_ids(request.request_id)
        table_start = request.num_block_ids_sent
        request.num_block_ids_sent = len(table)
        return ScheduledRequest(
            req_id=request.request_id,
            token_ids=token_ids + spec,
            num_computed_tokens=start,
            new_block_ids=table[table_start:],
            do_sample=end >= request.num_tokens,
            block_table_start=table_start,
            spec_token_ids=spec,
            is_prompt_step=request.is_prompt_position(start),
        )

    def _pick_victim(self, candidates: list[Request]) -> Request:
        protected = self.config.max_preemptions_before_protected
        eligible = [r for r in candidates if r.num_preemptions < protected] or candidates
        return max(eligible, key=lambda r: r.sort_key)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_block_ids_sent = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.push_front(request)

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        is_stop_token = token in request.eos_token_ids or token in request.stop_token_ids
        if is_stop_token and params.can_stop(request.num_output_tokens):
            request.stop_reason = token if token in request.stop_token_ids else None
            return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _remove_running(self, request: Request, status: RequestStatus) -> None:
        if request in self.running:
            self.running.remove(request)
        self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            self.slo_stats.record_finished(request)
        self.kv.free(request)
        del self.requests[request.request_id]
        if request.request_id in self._announced:
            self._announced.discard(request.request_id)
            self._finished_ids.append(request.request_id)

    def _build_output(
        self,
        scheduled: list[ScheduledRequest],
        new_requests: list[NewRequestData],
        finished: list[str],
    ) -> SchedulerOutput:
        num_prefill = sum(len(s.token_ids) for s in scheduled if s.is_prompt_step)
        total = sum(len(s.token_ids) for s in scheduled)
        return SchedulerOutput(
            scheduled=scheduled,
            new_requests=new_requests,
            finished_req_ids=finished,
            num_prefill_tokens=num_prefill,
            num_decode_tokens=total - num_prefill,
        )
