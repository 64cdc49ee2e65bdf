"""Serving metrics of a simulated run, defined as vLLM's serving benchmark defines them.

TTFT: send -> first token. TPOT: (finish - first token) / (output tokens - 1), per request.
ITL: gaps between a request's successive token-bearing steps. E2E: send -> finish. Throughput
over the run's duration (first send at 0 to last finish). Goodput: requests per second that met
every per-request target. A run meets the SLO when at least the SLO's percentile of requests
(99% by default, as MLPerf's server scenario) met every target.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tokenmill.errors import ConfigError
from tokenmill.plan.simulate import RequestRecord, SimResult

_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_SLO_KEYS = ("ttft", "tpot", "itl", "e2e")


@dataclass(frozen=True)
class Stats:
    mean: float
    median: float
    p90: float
    p99: float

    def percentile_value(self, pct: float) -> float:
        return {50.0: self.median, 90.0: self.p90, 99.0: self.p99}.get(pct, self.p99)


def stats(values: Sequence[float]) -> Stats:
    if not len(values):
        return Stats(0.0, 0.0, 0.0, 0.0)
    arr = np.asarray(values, dtype=float)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return Stats(float(arr.mean()), float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds; None: no target. `percentile` (50, 90 or 99) is the share of
    requests a configuration must serve within the targets to meet the SLO."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None
    percentile: float = 99.0

    def met_by(self, rec: RequestRecord, itl_max: float | None) -> bool:
        ttft = rec.first_token_s - rec.sent_s
        checks = (
            (self.ttft_s, ttft),
            (self.tpot_s, _tpot(rec)),
            (self.itl_s, itl_max),
            (self.e2e_s, rec.finish_s - rec.sent_s),
        )
        return all(limit is None or value is None or value <= limit for limit, value in checks)

    def describe(self) -> str:
        parts = [
            f"{key} <= {getattr(self, key + '_s') * 1e3:g} ms"
            for key in _SLO_KEYS
            if getattr(self, key + "_s") is not None
        ]
        return f"p{self.percentile:g} " + ", ".join(parts) if parts else "none"


def parse_slo(text: str) -> SLO:
    """`ttft=500ms,tpot=50ms[,itl=..][,e2e=10s][,pct=90]` -> SLO; ConfigError when malformed."""
    values: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in (*_SLO_KEYS, "pct"):
            raise ConfigError(
                f"bad SLO item {item!r}; use ttft=500ms,tpot=50ms[,itl=..,e2e=..,pct=99]"
            )
        if key == "pct":
            values["percentile"] = _number(raw, item)
            if values["percentile"] not in (50, 90, 99):
                raise ConfigError(f"SLO pct must be 50, 90 or 99, got {raw}")
            continue
        match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(s|ms|us)?\s*", raw)
        if not match:
            raise ConfigError(f"bad SLO value {item!r}: give a duration like 500ms or 0.5s")
        seconds = _number(match.group(1), item) * _UNITS[match.group(2) or "ms"]
        if not seconds > 0:
            raise ConfigError(f"SLO {key} must be a positive duration, got {raw}")
        values[f"{key}_s"] = seconds
    if not any(k.endswith("_s") for k in values):
        raise ConfigError(f"SLO {text!r} sets no target")
    return SLO(**values)


def _number(raw: str, item: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"bad SLO value {item!r}") from None


def _tpot(rec: RequestRecord) -> float | None:
    if rec.output_len < 2:
        return None
    return (rec.finish_s - rec.first_token_s) / (rec.output_len - 1)


@dataclass(frozen=True)
class SimMetrics:
    num_requests: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2e: Stats
    output_tok_s: float
    input_tok_s: float
    request_s: float
    per_user_tok_s: float  # 1 / median TPOT: a user's streaming speed
    goodput_req_s: float | None
    slo_attainment: float | None  # fraction of requests within every target
    meets_slo: bool | None
    num_preemptions: int


def summarize(result: SimResult, slo: SLO | None = None) -> SimMetrics:
    recs = [r for r in result.records if r.finish_s is not None]
    itls_by_req = [np.diff(r.token_event_s) if len(r.token_event_s) > 1 else [] for r in recs]
    ttft = stats([r.first_token_s - r.sent_s for r in recs])
    tpot = stats([t for t in map(_tpot, recs) if t is not None])
    duration = max(result.duration_s, 1e-12)
    out_tokens = sum(r.output_len for r in recs)
    in_tokens = sum(r.prompt_len for r in recs)
    goodput = attainment = meets = None
    if slo is not None:
        ok = [
            slo.met_by(r, float(np.max(i)) if len(i) else None)
            for r, i in zip(recs, itls_by_req, strict=True)
        ]
        attainment = sum(ok) / max(len(ok), 1)
        goodput = sum(ok) / duration
        meets = attainment >= slo.percentile / 100 - 1e-9
    return SimMetrics(
        num_requests=len(recs),
        duration_s=result.duration_s,
        input_tokens=in_tokens,
        output_tokens=out_tokens,
        ttft=ttft,
        tpot=tpot,
        itl=stats(np.concatenate([np.asarray(i, float) for i in itls_by_req]) if recs else []),
        e2e=stats([r.finish_s - r.sent_s for r in recs]),
        output_tok_s=out_tokens / duration,
        input_tok_s=in_tokens / duration,
        request_s=len(recs) / duration,
        per_user_tok_s=1.0 / tpot.median if tpot.median > 0 else 0.0,
        goodput_req_s=goodput,
        slo_attainment=attainment,
        meets_slo=meets,
        num_preemptions=result.num_preemptions,
    )
