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


def ranked(gains: list[list[float]]) -> list[int]:
    """Requests in the order their drafts are taken: the largest gain first (each request's
    gains decrease, so its entries come in position order; ties: the lower index first)."""
    entries = [(g, r) for r, request_gains in enumerate(gains) for g in request_gains]
    entries.sort(key=lambda entry: -entry[0])  # stable: equal gains keep the request order
    return [r for _, r in entries]


def choose_drafts(
    gains: list[list[float]],
    step_seconds: Callable[[list[int]], float],
    max_total: int | None = None,
) -> list[int]:
    """Draft counts per request maximising (tokens emitted) / (step + draft time), at most
    `max_total` drafts in all. `step_seconds(counts)` prices a step with those counts (verify
    and drafting together). The allocations of growing n extend each other, so one pass down
    the ranked gains builds them all (at 32 requests, ~0.03 ms instead of ~0.3 ms a step)."""
    order = ranked(gains)
    total = len(order) if max_total is None else min(len(order), max_total)
    plain_s = step_seconds([0] * len(gains))
    plain_rate = len(gains) / plain_s if plain_s > 0 else float(len(gains))
    best_counts, best_rate = [0] * len(gains), plain_rate
    counts, tokens, taken = [0] * len(gains), float(len(gains)), 0
    for n in candidate_counts(total)[1:]:
        for r in order[taken:n]:
            tokens += gains[r][counts[r]]
            counts[r] += 1
        taken = n
        seconds = step_seconds(counts)
        rate = tokens / seconds if seconds > 0 else tokens
        if rate > best_rate * 1.0001:  # a tie keeps the fewer drafts
            best_counts, best_rate = list(counts), rate
    return best_counts if best_rate >= plain_rate * (1 + MIN_GAIN) else [0] * len(gains)
