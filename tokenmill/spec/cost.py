"""The price of a verify step: the engine's decode-step prediction plus a marginal cost per
extra (draft) token, learned from measured verify steps per batch-size bucket.

The roofline gives the first guess of the marginal cost (near zero while a step streams weights,
a token's FLOPs once it is compute-bound); what this machine's kernels really do with k + 1
tokens per request (one fused call, or an eager pass) is measured and replaces it. Until it is,
the step that measures it carries few drafts (`probe_cap`): the guess can be several times low
(0.2 ms a draft at batch 64 here, where steps of ~100-140 drafts measured ~0.7-0.8 ms).

A measured verify step's marginal is its excess over a plain decode step of the same requests.
That plain step is the predictor's, which is corrected globally, not per batch size: at batch
64 its few-percent error is larger than the drafts' whole cost. So the plain prediction carries
a per-bucket bias, learned from the measured plain decode steps of that bucket, and the
marginal is taken against the biased prediction: a difference of two measurements.
"""

from __future__ import annotations

from collections.abc import Callable

from tokenmill.engine.slo_predictor import StepTimePredictor
from tokenmill.perf.step_cost import BatchShape, RequestShape

ALPHA = 0.2
FALLBACK_DECODE_S = 0.02  # without a predictor: a typical small-model CPU decode step
MEMO_CONTEXT, MEMO_USES = 128, 32  # a decode prediction is reused within these
PROBE_SHARE = 4  # the first verify step of a bucket drafts at most batch / PROBE_SHARE tokens


def bucket(batch_size: int) -> int:
    return max(batch_size, 1).bit_length()  # 1, 2-3, 4-7, ...


class VerifyCost:
    def __init__(self, predictor: StepTimePredictor | None) -> None:
        self.predictor = predictor
        self.marginal_s: dict[int, float] = {}  # per batch bucket: seconds per extra token
        self.plain_bias_s: dict[int, float] = {}  # per bucket: measured - predicted plain step
        # Per bucket, EMAs of a verify step's excess over the plain step and of its drafts:
        # their ratio weighs each step by its drafts (a step of 2 drafts says little).
        self._excess_s: dict[int, float] = {}
        self._extra: dict[int, float] = {}
        self._memo: tuple[tuple[int, int], float, int] | None = None  # key, seconds, uses

    def decode_seconds(self, contexts: list[int]) -> float:
        """A plain decode step of requests with these cached lengths: the prediction plus its
        bias measured at this batch size."""
        return self._predicted(contexts) + self.plain_bias_s.get(bucket(len(contexts)), 0.0)

    def _predicted(self, contexts: list[int]) -> float:
        """The predictor's plain decode step. A prediction costs ~0.1 ms (a 7 ms step at batch
        1), so it is reused while the batch size and the mean context to MEMO_CONTEXT tokens
        stay the same, MEMO_USES times at most (the correction moves)."""
        if self.predictor is None:
            return FALLBACK_DECODE_S
        key = (len(contexts), sum(contexts) // (MEMO_CONTEXT * max(len(contexts), 1)))
        if self._memo is not None and self._memo[0] == key and self._memo[2] < MEMO_USES:
            self._memo = (key, self._memo[1], self._memo[2] + 1)
            return self._memo[1]
        seconds = self.predictor.predict_shapes([RequestShape(1, c, 1) for c in contexts])
        self._memo = (key, seconds, 1)
        return seconds

    def probe_cap(self, batch_size: int) -> int | None:
        """The most drafts a step of this many requests may carry while the bucket's marginal
        is still the roofline's guess (None once measured)."""
        if bucket(batch_size) in self._extra:
            return None
        return max(1, batch_size // PROBE_SHARE)

    def pricer(self, contexts: list[int]) -> Callable[[int], float]:
        """Seconds of a verify step of these requests with n extra tokens in all, as a function
        of n: one prediction for the many allocations "auto" compares each step."""
        base = self.decode_seconds(contexts)
        marginal = self.marginal(contexts)
        return lambda extra: base + extra * marginal

    def marginal(self, contexts: list[int]) -> float:
        key = bucket(len(contexts))
        if key not in self.marginal_s:
            self.marginal_s[key] = self._roofline_marginal(contexts)
        return self.marginal_s[key]

    def _roofline_marginal(self, contexts: list[int]) -> float:
        if self.predictor is None:
            return FALLBACK_DECODE_S / 8
        # Both steps through the decode kind's correction (its per-token cost included).
        correction = self.predictor.corrections["decode"]
        steps = [
            BatchShape.from_requests([RequestShape(n, c, n) for c in contexts]) for n in (1, 2)
        ]
        base, more = (
            correction.apply(self.predictor.model.seconds(b), b.num_tokens) for b in steps
        )
        return max(more - base, 0.0) / len(contexts)

    def observe(self, contexts: list[int], num_extra: int, measured_s: float) -> None:
        """A measured decode step (no prompt tokens) of these requests with num_extra drafts in
        all (0: a plain step, which teaches the bias)."""
        if not contexts:
            return
        key = bucket(len(contexts))
        if num_extra <= 0:
            error = measured_s - self._predicted(contexts)
            old = self.plain_bias_s.get(key)
            self.plain_bias_s[key] = error if old is None else old + ALPHA * (error - old)
            return
        excess = measured_s - self.decode_seconds(contexts)
        if key not in self._extra:
            self._excess_s[key], self._extra[key] = excess, float(num_extra)
        else:
            self._excess_s[key] += ALPHA * (excess - self._excess_s[key])
            self._extra[key] += ALPHA * (num_extra - self._extra[key])
        self.marginal_s[key] = max(self._excess_s[key] / self._extra[key], 0.0)
