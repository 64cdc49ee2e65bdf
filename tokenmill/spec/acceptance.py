"""Measured acceptance: per draft position, the chance a draft is accepted given that every
draft before it was, as an exponential moving average per request and state (seeded from all
requests' average, so a new request starts from what the proposer usually achieves)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# Before anything is measured: prompt lookup is right about half the time in chat; a draft
# model (a smaller or quantized copy of the target) mostly agrees with it.
PRIORS = {"ngram": 0.6, "draft": 0.85, "self": 0.9}
ALPHA = 0.3  # weight of the newest observation


@dataclass
class SpecCounters:
    """Totals since the engine started: what /metrics and the planner read."""

    num_drafts: int = 0  # verify passes (one per request per step with >= 1 draft)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    drafted_per_pos: list[int] = field(default_factory=list)
    accepted_per_pos: list[int] = field(default_factory=list)

    def record(self, num_drafted: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        for counts, n in (
            (self.drafted_per_pos, num_drafted),
            (self.accepted_per_pos, num_accepted),
        ):
            if len(counts) < num_drafted:
                counts.extend([0] * (num_drafted - len(counts)))
            for i in range(n):
                counts[i] += 1

    def snapshot(self) -> SpecCounters:
        return replace(
            self,
            drafted_per_pos=list(self.drafted_per_pos),
            accepted_per_pos=list(self.accepted_per_pos),
        )

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def acceptance_per_position(self) -> list[float]:
        pairs = zip(self.accepted_per_pos, self.drafted_per_pos, strict=True)
        return [a / d if d else 0.0 for a, d in pairs]


class PositionRates:
    """EMAs of the conditional acceptance at each draft position. A position never drafted
    reads as the deepest one measured (flat onwards): a request whose six drafts keep standing
    is offered a seventh and an eighth, where a fixed prior for them (0.6) would never let
    `auto` try them, and so never learn them."""

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.seen = 0  # positions 0 .. seen - 1 have been measured

    def view(self) -> list[float]:
        if self.seen == 0:
            return list(self.values)
        return self.values[: self.seen] + [self.values[self.seen - 1]] * (
            len(self.values) - self.seen
        )

    def observe(self, hits: list[float], alpha: float) -> None:
        """One verify's outcome at positions 0 .. len(hits) - 1 (1 accepted, 0 rejected)."""
        self.values = self.view()  # positions reached for the first time start from it
        for i, hit in enumerate(hits):
            self.values[i] += alpha * (hit - self.values[i])
        self.seen = max(self.seen, len(hits))


class AcceptanceModel:
    """Rates kept apart by a state the proposer reports with each draft: for prompt lookup the
    length of the suffix it matched. A match on 5 tokens is text being copied (a quoted
    function, a repeated line); one on 2 is often chance: on the batch-1 grounded prompts with
    k = 8, 0.85 of the drafts after a 5-token match stood against 0.32 after a 2-token one
    (12-07), and one average drafts too few in the first case and too many in the second."""

    def __init__(self, max_drafts: int, prior: float) -> None:
        self.max_drafts = max_drafts
        self.prior = prior
        self.global_rate: dict[int, PositionRates] = {}
        self._per_request: dict[str, dict[int, PositionRates]] = {}

    def rates(self, request_id: str, state: int = 0) -> list[float]:
        """Conditional acceptance per position for this request's drafts made in `state`."""
        rates = self._per_request.get(request_id, {}).get(state)
        return (rates or self._global(state)).view()

    def observe(self, request_id: str, num_drafted: int, num_accepted: int, state: int = 0) -> None:
        """Positions up to the first rejection were seen: accepted ones count 1, the rejected
        one 0; positions after it say nothing."""
        global_rate = self._global(state)
        per_state = self._per_request.setdefault(request_id, {})
        rates = per_state.setdefault(state, PositionRates(global_rate.view()))
        seen = min(num_drafted, num_accepted + 1, self.max_drafts)
        hits = [1.0 if i < num_accepted else 0.0 for i in range(seen)]
        rates.observe(hits, ALPHA)
        global_rate.observe(hits, ALPHA / 4)

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._per_request.pop(rid, None)

    def _global(self, state: int) -> PositionRates:
        if state not in self.global_rate:
            self.global_rate[state] = PositionRates([self.prior] * self.max_drafts)
        return self.global_rate[state]
