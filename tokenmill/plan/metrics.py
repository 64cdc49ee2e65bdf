"""Serving metrics of a simulated run, defined as vLLM's serving benchmark defines them.

TTFT: send -> first token. TPOT: (finish - first token) / (output tokens - 1), per request.
ITL: gaps between a request's successive token-bearing steps. E2E: send -> finish. Throughput
over the run's duration (first send at 0 to last finish). Goodput: requests per second that met
every per-request target. A run meets the SLO (tokenmill.workload.slo) when at least the SLO's
percentile of requests met every target.

A steady-state open-loop run (plan/load.py) measures a window: latencies of the requests sent in
it, throughput as the output tokens produced during it over its length, and `offered_tok_s`, the
output tokens those requests asked for over the same length. A deployment that produces less
than it is offered is overloaded: its queue grows with the run and its latencies never settle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tokenmill.plan.simulate import RequestRecord, SimResult
from tokenmill.workload.slo import SLO

OVERLOAD_SHARE = 0.97  # produced / offered below this, with latency growing: the queue grows
LATENCY_GROWTH = 1.25  # the last quarter's median E2E over the first quarter's


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
    offered_tok_s: float | None = None  # open loop: output tokens asked for per second
    is_overloaded: bool = False  # open loop: produced less than was sent in the window


def _tokens_in(rec: RequestRecord, start: float, end: float) -> float:
    """Output tokens `rec` produced in [start, end] (tokens per step averaged when a step gave
    several: accepted drafts)."""
    if not rec.token_event_s:
        return 0.0
    inside = sum(1 for t in rec.token_event_s if start <= t <= end)
    return inside * rec.output_len / len(rec.token_event_s)


def _waiting(records: Sequence[RequestRecord], t: float) -> int:
    """Requests sent by `t` that had not started yet (no first token) at `t`."""
    return sum(
        1 for r in records if r.sent_s <= t and (r.first_token_s is None or r.first_token_s > t)
    )


def _latency_grows(records: Sequence[RequestRecord]) -> bool:
    """Whether the last quarter of the measured requests waited clearly longer than the first:
    a growing queue, rather than a window that by chance saw more arrivals than it finished."""
    done = sorted((r for r in records if r.finish_s is not None), key=lambda r: r.sent_s)
    quarter = len(done) // 4
    if quarter < 2:
        return True
    first, last = (
        float(np.median([r.finish_s - r.sent_s for r in part]))
        for part in (done[:quarter], done[-quarter:])
    )
    return last > LATENCY_GROWTH * first


def _window_rates(
    result: SimResult,
    window_s: tuple[float, float],
    in_tokens: int,
    out_tokens: int,
    nominal_tok_s: tuple[float, float] | None,
) -> tuple[float, float, float, bool]:
    """(input tok/s, output tok/s, offered output tok/s, overloaded) of a measured window."""
    duration = max(window_s[1] - window_s[0], 1e-12)
    out_rate = sum(_tokens_in(r, *window_s) for r in result.records) / duration
    sent = [r for r in result.records if window_s[0] <= r.sent_s < window_s[1]]
    offered = out_tokens / duration
    queue_growth = _waiting(result.records, window_s[1]) - _waiting(result.records, window_s[0])
    overloaded = out_rate < OVERLOAD_SHARE * offered and (
        queue_growth >= max(3, len(sent) // 10) or _latency_grows(sent)
    )
    if overloaded:
        # Saturated from the window's start until the last measured request finished: what it
        # produced over that span is its capacity.
        span = (window_s[0], max(result.duration_s, window_s[1]))
        out_rate = sum(_tokens_in(r, *span) for r in result.records) / (span[1] - span[0])
    in_rate = in_tokens / duration * min(1.0, out_rate / max(offered, 1e-12))
    if nominal_tok_s is not None:
        # Never more than offered on average: a window's extra arrivals are noise, not capacity.
        in_rate = min(in_rate, nominal_tok_s[0]) if overloaded else nominal_tok_s[0]
        out_rate = min(out_rate, nominal_tok_s[1]) if overloaded else nominal_tok_s[1]
        offered = nominal_tok_s[1]
    return in_rate, out_rate, offered, overloaded


def summarize(
    result: SimResult,
    slo: SLO | None = None,
    measured: range | None = None,
    window_s: tuple[float, float] | None = None,
    nominal_tok_s: tuple[float, float] | None = None,
) -> SimMetrics:
    """Metrics of the requests in `measured` (indices in arrival order; default all); with
    `window_s`, throughput is what was produced in that window. `nominal_tok_s` (input, output
    tokens/s the arrival rate offers on average): a run that keeps up reports these, since in
    the steady state a deployment that keeps up produces what it is offered; the window's own
    count differs from them only by the sampling noise of its arrivals."""
    recs = [r for r in result.records if r.finish_s is not None]
    if measured is not None:
        recs = [r for r in recs if int(r.req_id) in measured]
    itls_by_req = [np.diff(r.token_event_s) if len(r.token_event_s) > 1 else [] for r in recs]
    ttft = stats([r.first_token_s - r.sent_s for r in recs])
    tpot = stats([t for t in map(_tpot, recs) if t is not None])
    out_tokens = sum(r.output_len for r in recs)
    in_tokens = sum(r.prompt_len for r in recs)
    duration = max(result.duration_s, 1e-12)
    rates = (in_tokens / duration, out_tokens / duration, None, False)
    if window_s is not None:
        duration = max(window_s[1] - window_s[0], 1e-12)
        rates = _window_rates(result, window_s, in_tokens, out_tokens, nominal_tok_s)
    in_rate, out_rate, offered, overloaded = rates
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
        # An overloaded deployment misses whatever its first requests saw: its queue grows.
        meets = attainment >= slo.percentile / 100 - 1e-9 and not overloaded
    return SimMetrics(
        num_requests=len(recs),
        duration_s=result.duration_s,
        input_tokens=in_tokens,
        output_tokens=out_tokens,
        ttft=ttft,
        tpot=tpot,
        itl=stats(np.concatenate([np.asarray(i, float) for i in itls_by_req]) if recs else []),
        e2e=stats([r.finish_s - r.sent_s for r in recs]),
        output_tok_s=out_rate,
        input_tok_s=in_rate,
        request_s=len(recs) / duration,
        per_user_tok_s=1.0 / tpot.median if tpot.median > 0 else 0.0,
        goodput_req_s=goodput,
        slo_attainment=attainment,
        meets_slo=meets,
        num_preemptions=result.num_preemptions,
        offered_tok_s=offered,
        is_overloaded=overloaded,
    )
