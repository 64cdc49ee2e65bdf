"""When requests are sent: all at once, Poisson, or gamma-distributed gaps with a burstiness,
optionally behind a fixed concurrency limit.

Gaps follow vLLM's serving benchmark: gamma(shape=burstiness, scale=1 / (rate * burstiness)),
so the mean rate is `rate` for any burstiness; burstiness 1 is a Poisson process, below 1 is
burstier, above 1 more even. The first request is sent at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tokenmill.errors import ConfigError


@dataclass(frozen=True)
class ArrivalSpec:
    rate: float = math.inf  # requests per second; inf sends everything at 0
    burstiness: float = 1.0
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ConfigError(f"request rate must be > 0 (or inf), got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ConfigError(f"burstiness must be a positive number, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.max_concurrency}")

    def offsets(self, num_requests: int, seed: int = 0) -> list[float]:
        """Send times, in seconds from the start, of `num_requests` requests."""
        if math.isinf(self.rate):
            return [0.0] * num_requests
        rng = np.random.default_rng(seed)
        scale = 1.0 / (self.rate * self.burstiness)
        gaps = rng.gamma(shape=self.burstiness, scale=scale, size=max(num_requests - 1, 0))
        return [0.0, *np.cumsum(gaps).tolist()][:num_requests]

    def describe(self) -> str:
        parts = []
        if math.isinf(self.rate):
            parts.append("all at once")
        elif self.burstiness == 1.0:
            parts.append(f"Poisson at {self.rate:g} req/s")
        else:
            parts.append(f"gamma arrivals at {self.rate:g} req/s, burstiness {self.burstiness:g}")
        if self.max_concurrency is not None:
            parts.append(f"at most {self.max_concurrency} in flight")
        return ", ".join(parts)
