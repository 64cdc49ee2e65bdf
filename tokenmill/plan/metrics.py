"""Serving metrics of a simulated run, defined as vLLM's serving benchmark defines them.

TTFT: send -> first token. TPOT: (finish - first token) / (output tokens - 1), per request.
ITL: gaps between a request's successive token-bearing steps. E2E: send -> finish. Throughput
over the run's duration (first send at 0 to last finish). Goodput: requests per second that met
every per-request target. A run meets the SLO (tokenmill.workload.slo) when at least the SLO's
percentile of requests met every target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tokenmill.plan.simulate import RequestRecord, SimResult
from tokenmill.workload.slo import SLO


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
            slo.is_met(
                r.first_token_s - r.sent_s, _tpot(r), float(np.max(i)) if len(i) else None,
                r.finish_s - r.sent_s,
            )
            for r, i in zip(recs, itls_by_req, strict=True)
        ]  # fmt: skip
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
