"""Acceptance per draft position as the engine measured it, for `tokenmill plan --spec-decode`.

The engine counts, per draft position i, the drafts verified there (drafted[i]) and accepted
(accepted[i]) (tokenmill:spec_decode_num_{draft,accepted}_tokens_per_pos_total). A draft at i is
only reached when every draft before it was accepted, so the conditional acceptance is

    a[0] = accepted[0] / drafted[0]
    a[i] = accepted[i] / (accepted[i-1] * drafted[i] / drafted[i-1])     (i > 0)

(exact for a fixed k, where drafted[i] is the same at every position).
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenmill.errors import ConfigError

_LINE = re.compile(
    r'^tokenmill:spec_decode_num_(draft|accepted)_tokens_per_pos_total\{[^}]*position="(\d+)"'
    r"[^}]*\}\s+([0-9.eE+-]+)"
)


def conditional_acceptance(drafted: list[float], accepted: list[float]) -> tuple[float, ...]:
    rates = []
    for i, (d, a) in enumerate(zip(drafted, accepted, strict=True)):
        reached = d if i == 0 else accepted[i - 1] * d / drafted[i - 1]
        if reached <= 0:
            break
        rates.append(min(a / reached, 1.0))
    return tuple(rates)


def measured_acceptance(source: str) -> tuple[float, ...]:
    """Per-position acceptance from a tokenmill server's /metrics (a URL) or a saved copy."""
    if source.startswith(("http://", "https://")):
        import httpx

        url = source if source.rstrip("/").endswith("/metrics") else source.rstrip("/") + "/metrics"
        text = httpx.get(url, timeout=10).text
    else:
        text = Path(source).read_text()
    counts: dict[str, dict[int, float]] = {"draft": {}, "accepted": {}}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            kind, pos, value = match.groups()
            counts[kind][int(pos)] = counts[kind].get(int(pos), 0.0) + float(value)
    positions = sorted(counts["draft"])
    if not positions or not counts["draft"][positions[0]]:
        raise ConfigError(f"no speculative decoding counters with drafts in {source}")
    drafted = [counts["draft"][p] for p in positions]
    accepted = [counts["accepted"].get(p, 0.0) for p in positions]
    return conditional_acceptance(drafted, accepted)
