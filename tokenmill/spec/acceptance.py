"""Measured acceptance: per draft position, the chance a draft is accepted given that every
draft before it was, as an exponential moving average per request (seeded from all requests'
average, so a new request starts from what the proposer usually achieves)."""

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


class AcceptanceModel:
    def __init__(self, max_drafts: int, prior: float) -> None:
        self.max_drafts = max_drafts
        self.global_rate = [prior] * max_drafts
        self._per_request: dict[str, list[float]] = {}

    def rates(self, request_id: str) -> list[float]:
        """Conditional acceptance per position for this request."""
        rates = self._per_request.get(request_id)
        return list(self.global_rate) if rates is None else rates

    def observe(self, request_id: str, num_drafted: int, num_accepted: int) -> None:
        """Positions up to the first rejection were seen: accepted ones count 1, the rejected
        one 0; positions after it say nothing."""
        rates = self._per_request.setdefault(request_id, list(self.global_rate))
        for i in range(min(num_drafted, num_accepted + 1, self.max_drafts)):
            hit = 1.0 if i < num_accepted else 0.0
            rates[i] += ALPHA * (hit - rates[i])
            self.global_rate[i] += ALPHA / 4 * (hit - self.global_rate[i])

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._per_request.pop(rid, None)
