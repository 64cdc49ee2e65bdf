"""Latency targets (SLOs) and their one string syntax, shared by `tokenmill plan --slo` and
`tokenmill bench serve --slo` (and anything else that takes targets, such as the server):

    ttft=2s,tpot=100ms[,itl=200ms][,e2e=30s][,pct=99]

Durations take the unit ms or s; a bare number is milliseconds. A request meets the SLO when
every target it sets holds: TTFT (send -> first token), TPOT (per output token after the first),
ITL (its longest gap between tokens), E2E (send -> last token). `pct` (50, 90 or 99; default 99,
as MLPerf's server scenario) is the share of requests a run must serve within the targets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenmill.errors import ConfigError

SLO_KEYS = ("ttft", "tpot", "itl", "e2e")
SYNTAX = "ttft=2s,tpot=100ms[,itl=..][,e2e=..][,pct=99]"
_UNITS = {"s": 1.0, "ms": 1e-3}
_DURATION = re.compile(r"([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(s|ms)?")


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds (None: no target) and the percentile of requests that must
    meet them."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None
    percentile: float = 99.0

    def is_met(
        self,
        ttft_s: float | None,
        tpot_s: float | None,
        itl_max_s: float | None,
        e2e_s: float | None,
    ) -> bool:
        """One request's measurements against every target; a measurement that does not exist
        (None: TPOT of a one-token output, ITL of fewer than two tokens) meets its target."""
        checks = (
            (self.ttft_s, ttft_s), (self.tpot_s, tpot_s), (self.itl_s, itl_max_s),
            (self.e2e_s, e2e_s),
        )  # fmt: skip
        return all(limit is None or value is None or value <= limit for limit, value in checks)

    def targets_ms(self) -> dict[str, float]:
        """The targets set, in milliseconds, by key (ttft, tpot, itl, e2e)."""
        targets = {key: getattr(self, f"{key}_s") for key in SLO_KEYS}
        return {key: s * 1e3 for key, s in targets.items() if s is not None}

    def describe(self) -> str:
        parts = [f"{key} <= {ms:g} ms" for key, ms in self.targets_ms().items()]
        return f"p{self.percentile:g} " + ", ".join(parts) if parts else "none"


def parse_slo(text: str) -> SLO:
    """`ttft=2s,tpot=100ms[,itl=..][,e2e=..][,pct=99]` -> SLO; a ConfigError names the bad
    part."""
    values: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, raw = item.partition("=")
        key, raw = key.strip().lower(), raw.strip()
        if not sep or key not in (*SLO_KEYS, "pct"):
            raise ConfigError(f"bad SLO item {item!r}: expected key=value with a key of "
                              f"{', '.join(SLO_KEYS)} or pct; e.g. {SYNTAX}")  # fmt: skip
        if key == "pct":
            values["percentile"] = _pct(raw)
        else:
            values[f"{key}_s"] = _duration_s(key, raw)
    if not any(k.endswith("_s") for k in values):
        raise ConfigError(f"SLO {text!r} sets no target; e.g. {SYNTAX}")
    return SLO(**values)


def _duration_s(key: str, raw: str) -> float:
    match = _DURATION.fullmatch(raw)
    if not match:
        raise ConfigError(
            f"bad SLO {key} value {raw!r}: give a duration like 500ms or 2s (a bare number is ms)"
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "ms"]
    if not seconds > 0:
        raise ConfigError(f"SLO {key} must be a positive duration, got {raw!r}")
    return seconds


def _pct(raw: str) -> float:
    try:
        pct = float(raw)
    except ValueError:
        pct = None
    if pct not in (50, 90, 99):
        raise ConfigError(f"SLO pct must be 50, 90 or 99, got {raw!r}")
    return pct
