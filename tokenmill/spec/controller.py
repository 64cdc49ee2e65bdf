"""How many drafts each request gets this step: the allocation that maximises expected tokens
per second, from the step-cost model and the measured acceptance.

With drafts k_r per request, a step emits sum_r (1 + E_r(k_r)) tokens on average, where
E_r(k) = sum_{i<=k} prod_{j<=i} a_r[j] (a_r: conditional acceptance per position), and takes
T(n) + D(k) seconds: the verify step with n = sum_r k_r extra tokens, and drafting. Each extra
draft's gain prod_{j<=i} a_r[j] falls with i, so the best allocation of n extra tokens takes the
n largest gains over all requests; the controller tries n on a geometric grid and keeps the
fastest. Under load the marginal cost of a token rises (the step turns compute-bound) and n = 0
wins by itself: no hand-set threshold turns speculation off. An allocation must beat n = 0 by
MIN_GAIN: the marginal cost it rests on is learned from steps whose time scatters by a few
percent (and a verify step's time jumps when its requests stop being single-token decodes),
so a smaller predicted gain is inside the model's error.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

MIN_GAIN = 0.03


def draft_gains(rates: list[float], cap: int) -> list[float]:
    """Expected extra accepted tokens of each successive draft (prefix products of rates)."""
    gains, prod = [], 1.0
    for rate in rates[:cap]:
        prod *= rate
        gains.append(prod)
    return gains


def candidate_counts(total: int) -> list[int]:
    """0, 1, 2, 3, 4, 6, 8, 12, ... up to total: where the throughput curve is evaluated."""
    counts, n = [0], 1
    while n < total:
        counts.append(n)
        n = n + 1 if n < 4 else n * 3 // 2
    counts.append(total)
    return sorted(set(counts))


def allocate(gains: list[list[float]], n: int) -> list[int]:
    """The draft counts that take the n largest gains (each request's gains decrease)."""
    counts = [0] * len(gains)
    heap = [(-g[0], r) for r, g in enumerate(gains) if g]
    heapq.heapify(heap)
    for _ in range(n):
        if not heap:
            break
        _, r = heapq.heappop(heap)
        counts[r] += 1
        if counts[r] < len(gains[r]):
            heapq.heappush(heap, (-gains[r][counts[r]], r))
    return counts


def choose_drafts(
    gains: list[list[float]],
    step_seconds: Callable[[list[int]], float],
    max_total: int | None = None,
) -> list[int]:
    """Draft counts per request maximising (tokens emitted) / (step + draft time), at most
    `max_total` drafts in all. `step_seconds(counts)` prices a step with those counts (verify
    and drafting together)."""
    total = sum(len(g) for g in gains)
    if max_total is not None:
        total = min(total, max_total)
    best_counts, best_rate, plain_rate = [0] * len(gains), 0.0, 0.0
    for n in candidate_counts(total):
        counts = allocate(gains, n)
        tokens = len(gains) + sum(sum(g[:k]) for g, k in zip(gains, counts, strict=True))
        seconds = step_seconds(counts)
        rate = tokens / seconds if seconds > 0 else float(tokens)
        if n == 0:
            plain_rate = rate
        if rate > best_rate * 1.0001:  # a tie keeps the fewer drafts
            best_counts, best_rate = counts, rate
    return best_counts if best_rate >= plain_rate * (1 + MIN_GAIN) else [0] * len(gains)
