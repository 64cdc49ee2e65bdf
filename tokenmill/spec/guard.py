"""The last word of "auto": measured throughput with and without speculation, per batch size.

The controller's choice rests on predictions (acceptance, the marginal cost of a token, the
draft's cost); when they are wrong the loss is real. The guard compares what steps actually
delivered: emitted tokens per request per second of wall time (drafting included), as an EMA per
batch-size bucket, for steps that speculated and steps that did not. Speculation is allowed in a
bucket while it measures at least as fast; the other arm is still tried every EXPLORE-th step so
a change of workload is noticed. Steps with prompt tokens are not compared (their time is the
prompt's).

A bucket spans batch sizes whose steps differ ~2x in time (32 and 63 requests), and closed-loop
traffic visits its ends at different phases (ramp, drain), so each sample is divided by the
predicted plain step of its own batch: a rate relative to the plain step, in which the batch
size no longer decides which arm looks faster.
"""

from __future__ import annotations

from tokenmill.spec.cost import bucket

EXPLORE = 32
ALPHA = 0.1


class ThroughputGuard:
    def __init__(self) -> None:
        self.rate: dict[tuple[int, bool], float] = {}  # (bucket, speculated) -> tokens/req/s
        self._steps: dict[int, int] = {}

    def allows(self, batch_size: int) -> bool:
        """May the next step of this many decoding requests speculate?"""
        b = bucket(batch_size)
        self._steps[b] = n = self._steps.get(b, 0) + 1
        on, off = self.rate.get((b, True)), self.rate.get((b, False))
        if on is None or off is None:
            return off is not None  # measure without speculation first, then with it
        return (on >= off) != (n % EXPLORE == 0)

    def record(
        self,
        batch_size: int,
        speculated: bool,
        tokens: int,
        seconds: float,
        plain_seconds: float = 1.0,
    ) -> None:
        """A decode step's tokens and wall time; `plain_seconds`: the predicted plain decode
        step of the same requests (1: rates in tokens per request-second)."""
        if batch_size <= 0 or seconds <= 0:
            return
        key = (bucket(batch_size), speculated)
        sample = tokens / batch_size * plain_seconds / seconds
        old = self.rate.get(key)
        self.rate[key] = sample if old is None else old + ALPHA * (sample - old)
