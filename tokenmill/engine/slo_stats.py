"""What the engine counts about its latency promises: each finished request with targets, per
target kind (ttft, tpot) and class (its priority, or best_effort), attained or missed; the
requests that met every target (goodput) and their tokens; refusals by reason; the step-time
predictor's predicted against measured times; and each promised request's first token: when
admission predicted it against when it came (how right the promises' model is), summed and as
a histogram of measured / predicted."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from tokenmill.engine.slo_predictor import PredictionStats

if TYPE_CHECKING:
    from tokenmill.engine.request import Request

SLO_KINDS = ("ttft", "tpot")
# Upper bounds of the measured / predicted TTFT histogram: where admission's model is
# conservative (below 1) and where a promise ran over it (above 1: the misses' tail).
TTFT_RATIO_BOUNDS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, float("inf"))


@dataclass(frozen=True)
class SloSnapshot:
    attained: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, class) -> n
    missed: dict[tuple[str, str], int] = field(default_factory=dict)
    num_good_requests: int = 0  # finished meeting every target they set
    num_good_tokens: int = 0  # their output tokens
    refused: dict[str, int] = field(default_factory=dict)  # reason -> requests
    step_prediction: dict[str, PredictionStats] = field(default_factory=dict)  # kind -> sums
    ttft_prediction: PredictionStats = field(default_factory=PredictionStats)  # promised TTFTs
    ttft_ratio_counts: tuple[int, ...] = (0,) * len(TTFT_RATIO_BOUNDS)  # per bound, not cumulative
    ttft_ratio_sum: float = 0.0


def measured_latency(request: Request) -> dict[str, float | None]:
    """TTFT and TPOT on the scheduler's clock (TPOT None below two output tokens)."""
    first, last = request.first_token_time, request.last_token_time
    ttft = None if first is None else first - request.arrival_time
    n = request.num_output_tokens
    tpot = (last - first) / (n - 1) if first is not None and n >= 2 else None
    return {"ttft": ttft, "tpot": tpot}


class SloStats:
    def __init__(self) -> None:
        self.attained: dict[tuple[str, str], int] = {}
        self.missed: dict[tuple[str, str], int] = {}
        self.num_good_requests = 0
        self.num_good_tokens = 0
        self.refused: dict[str, int] = {}
        self.ttft_prediction = PredictionStats()
        self.ttft_ratio_counts = [0] * len(TTFT_RATIO_BOUNDS)
        self.ttft_ratio_sum = 0.0

    def record_first_token(self, request: Request) -> None:
        """A promised request's first token against the TTFT its admission predicted."""
        if not request.is_promised or request.predicted_first_token_time is None:
            return
        predicted = request.predicted_first_token_time - request.arrival_time
        measured = request.first_token_time - request.arrival_time
        self.ttft_prediction.add(predicted, measured)  # (its num_steps counts requests here)
        if predicted > 0:
            ratio = measured / predicted
            self.ttft_ratio_counts[bisect.bisect_left(TTFT_RATIO_BOUNDS, ratio)] += 1
            self.ttft_ratio_sum += ratio

    def record_finished(self, request: Request) -> None:
        """A request that ended normally; only the targets it set are counted."""
        if request.slo is None or request.first_token_time is None:
            return
        measured = measured_latency(request)
        is_good = True
        for kind in SLO_KINDS:
            target, value = getattr(request.slo, f"{kind}_s"), measured[kind]
            if target is None or value is None:
                continue
            counts = self.attained if value <= target else self.missed
            key = (kind, request.slo_class)
            counts[key] = counts.get(key, 0) + 1
            is_good = is_good and value <= target
        if is_good and (request.slo.ttft_s is not None or request.slo.tpot_s is not None):
            self.num_good_requests += 1
            self.num_good_tokens += request.num_output_tokens

    def record_refused(self, reason: str, num_requests: int = 1) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + num_requests

    def snapshot(self, prediction: dict[str, PredictionStats] | None = None) -> SloSnapshot:
        return SloSnapshot(
            attained=dict(self.attained),
            missed=dict(self.missed),
            num_good_requests=self.num_good_requests,
            num_good_tokens=self.num_good_tokens,
            refused=dict(self.refused),
            step_prediction={k: replace(v) for k, v in (prediction or {}).items()},
            ttft_prediction=replace(self.ttft_prediction),
            ttft_ratio_counts=tuple(self.ttft_ratio_counts),
            ttft_ratio_sum=self.ttft_ratio_sum,
        )
