"""The engine's speculation: after each step, propose drafts for the requests that decode next
(they ride in the next step beside everyone's decodes and prompt chunks), and learn from each
verification how often drafts are accepted and what extra tokens cost.

    step N:    schedule (drafts of step N-1 appended) -> execute + verify -> update (accepted
               tokens appended, rejected ones rolled back by lowering the computed count)
               -> observe (acceptance, cost) -> propose (drafts for step N+1)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from tokenmill.engine.interfaces import RunnerOutput, SchedulerOutput
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.spec.acceptance import PRIORS, AcceptanceModel, SpecCounters
from tokenmill.spec.config import SpeculativeConfig
from tokenmill.spec.controller import choose_drafts, draft_gains
from tokenmill.spec.cost import VerifyCost
from tokenmill.spec.guard import ThroughputGuard
from tokenmill.spec.proposer import Proposer

# A request "auto" gives no drafts still drafts one every this many steps, so its acceptance
# keeps being measured (a request written off early would never be reconsidered): at most a
# few percent more tokens where speculation does not pay.
EXPLORE_EVERY = 16


class SpecDecoder:
    def __init__(
        self,
        config: SpeculativeConfig,
        proposer: Proposer,
        cost: VerifyCost,
        max_model_len: int,
        room: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self.proposer = proposer
        self.cost = cost
        self.max_model_len = max_model_len
        self.room = room  # `auto`: the draft tokens the next step can take (spec/room.py)
        self.acceptance = AcceptanceModel(config.max_drafts, PRIORS[config.method])
        self._idle: dict[str, int] = {}  # proposals since a request last drafted
        self.counters = SpecCounters()
        self._tracked: set[str] = set()  # requests with acceptance or proposer state
        self.guard = ThroughputGuard() if config.is_auto else None
        self._last: tuple[bool, float] | None = None  # the last proposal: speculated, seconds
        self._drafted: list[Request] = []  # `auto`'s requests with drafts for the next step
        # The proposer's state for each request's pending drafts (acceptance is learned per
        # state); proposers without states (a draft model) are all in state 0.
        self._state_of = getattr(proposer, "state", lambda request_id: 0)
        self._states: dict[str, int] = {}

    # ---- after a step ----------------------------------------------------------------------

    def observe(self, sched_out: SchedulerOutput, runner_out: RunnerOutput, wall_s: float) -> None:
        contexts, num_extra, has_prompt = [], 0, False
        for s in sched_out.scheduled:
            has_prompt |= s.is_prompt_step
            contexts.append(s.num_computed_tokens)
            k = len(s.spec_token_ids)
            tokens = runner_out.sampled.get(s.req_id)
            if not k or tokens is None:
                continue
            accepted = _accepted(s.spec_token_ids, tokens)
            self.counters.record(k, accepted)
            self.acceptance.observe(s.req_id, k, accepted, self._states.pop(s.req_id, 0))
            num_extra += k
        if num_extra:
            self.counters.verify_time_s += wall_s
        if not has_prompt:
            self.cost.observe(contexts, num_extra, wall_s)
        last, self._last = self._last, None
        if self.guard is not None and last is not None and not has_prompt:
            tokens = sum(len(t) for t in runner_out.sampled.values())
            plain_s = self.cost.decode_seconds(contexts)
            self.guard.record(len(contexts), last[0], tokens, wall_s + last[1], plain_s)

    def propose(self, running: list[Request]) -> None:
        """Set `spec_token_ids` of the running requests that decode next."""
        start = time.perf_counter()
        self._release_gone(running)
        ready = [r for r in running if self._decodes_next(r)]
        caps = [self._cap(r) for r in ready]
        ready = [r for r, cap in zip(ready, caps, strict=True) if cap > 0]
        caps = [cap for cap in caps if cap > 0]
        if not ready:
            return
        room = self.room() if self.config.is_auto and self.room is not None else None
        # Prompt work fills the next step, or the guard measured drafting slower at this batch:
        # no drafts, and no lookups or allocation for them (at 128 requests, milliseconds).
        if room == 0 or (self.guard is not None and not self.guard.allows(len(ready))):
            self._last = (False, time.perf_counter() - start)
            return
        lookup = getattr(self.proposer, "is_lookup", False)
        drafts = self.proposer.propose(ready, caps) if lookup else None
        if drafts is not None:  # a lookup proposes cheaply: what it found bounds each count
            caps = [len(d) for d in drafts]
            self._tracked.update(r.request_id for r in ready)  # the proposer indexed them
        counts = caps if not self.config.is_auto else self._choose(ready, caps, room)
        if drafts is None:
            pick = [(r, k) for r, k in zip(ready, counts, strict=True) if k > 0]
            found = self.proposer.propose([r for r, _ in pick], [k for _, k in pick])
            drafts_of = {r.request_id: d for (r, _), d in zip(pick, found, strict=True)}
            drafts = [drafts_of.get(r.request_id, []) for r in ready]
        for request, draft, k in zip(ready, drafts, counts, strict=True):
            request.spec_token_ids = list(draft[:k])
            if k:
                self._tracked.add(request.request_id)
                self._states[request.request_id] = self._state_of(request.request_id)
        self._drafted = [r for r in ready if r.spec_token_ids] if room is not None else []
        seconds = time.perf_counter() - start
        self.counters.draft_time_s += seconds
        self._last = (any(counts), seconds)

    def before_schedule(self) -> None:
        """`auto` drafted into the room that pending prompts left when it proposed; prompts
        that arrived since (a closed-loop client sends its next request as soon as the last
        one's final token is out, i.e. after `propose`) would find the budget taken by drafts.
        Trim the drafts back into the room left now, the last (least likely) drafts first."""
        drafted, self._drafted = self._drafted, []
        counts = [len(r.spec_token_ids) for r in drafted]
        if not drafted or self.room is None:
            return
        room = self.room()
        if sum(counts) <= room:
            return
        counts = trim_counts(counts, room)
        for request, k in zip(drafted, counts, strict=True):
            del request.spec_token_ids[k:]
        if not any(counts) and self._last is not None:
            self._last = (False, self._last[1])

    # ---- helpers -----------------------------------------------------------------------

    def _choose(self, ready: list[Request], caps: list[int], room: int | None) -> list[int]:
        gains = [
            draft_gains(self.acceptance.rates(r.request_id, self._state_of(r.request_id)), cap)
            for r, cap in zip(ready, caps, strict=True)
        ]
        verify_s = self.cost.pricer([r.num_computed_tokens for r in ready])

        def step_seconds(counts: list[int]) -> float:
            return verify_s(sum(counts)) + self.proposer.draft_seconds(counts)

        caps_total = [c for c in (room, self.cost.probe_cap(len(ready))) if c is not None]
        limit = min(caps_total) if caps_total else None
        counts = choose_drafts(gains, step_seconds, limit)
        spare = math.inf if limit is None else limit - sum(counts)
        for i, (request, k) in enumerate(zip(ready, counts, strict=True)):
            idle = 0 if k else self._idle.get(request.request_id, 0) + 1
            if idle >= EXPLORE_EVERY and caps[i] and spare > 0:
                counts[i], idle, spare = 1, 0, spare - 1
            self._idle[request.request_id] = idle
            self._tracked.add(request.request_id)
        return counts

    @staticmethod
    def _decodes_next(request: Request) -> bool:
        return (
            request.status == RequestStatus.RUNNING
            and not request.spec_token_ids
            and request.num_computed_tokens == request.num_tokens - 1
            and request.sampling_params.prompt_logprobs is None
        )

    def _cap(self, request: Request) -> int:
        """Drafts that could still be emitted: within max_tokens and the context (the token
        sampled at the end of the step counts too)."""
        cap = self.config.max_drafts
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            cap = min(cap, max_tokens - request.num_output_tokens - 1)
        return min(cap, self.max_model_len - request.num_tokens - 1)

    def _release_gone(self, running: list[Request]) -> None:
        live = {r.request_id for r in running}
        gone = [rid for rid in self._tracked if rid not in live]
        if gone:
            self._tracked.difference_update(gone)
            self.acceptance.release(gone)
            for rid in gone:
                self._states.pop(rid, None)
                self._idle.pop(rid, None)
            self.proposer.release(gone)


def trim_counts(counts: list[int], total: int) -> list[int]:
    """Draft counts cut to `total` in all, the largest first (a request's later drafts are the
    least likely to stand)."""
    low, high = 0, max(counts, default=0)  # the highest level whose cut fits
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if sum(min(c, mid) for c in counts) <= total else (low, mid - 1)
    out = [min(c, low) for c in counts]
    spare = total - sum(out)
    for i, c in enumerate(counts):  # what is left: one more each for some above the level
        if spare <= 0:
            break
        if c > low:
            out[i], spare = out[i] + 1, spare - 1
    return out


def _accepted(drafts: list[int], emitted: list[int]) -> int:
    """How many drafts stood: the emitted tokens' common prefix with them (a rejected position
    emits another token). Not len(emitted) - 1: a run cut after an accepted ending token (EOS,
    a stop id) emits no bonus token, and that draft was accepted all the same."""
    count = 0
    for draft, token in zip(drafts, emitted, strict=False):
        if draft != token:
            break
        count += 1
    return count
