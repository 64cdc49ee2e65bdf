"""Serving metrics of a simulated run, defined as vLLM's serving benchmark defines them.

TTFT: send -> first token. TPOT: (finish - first token) / (output tokens - 1), per request.
ITL: gaps between a request's successive token-bearing steps. E2E: send -> finish. Throughput
over the run's duration (first send at 0 to last finish). Goodput: requests (and their output
tokens) per second that met every per-request target. A run meets the SLO (tokenmill.workload.slo)
when at least the SLO's percentile of requests met every target. Under latency promises
(plan/simulate.py) a refused request has no latencies and counts as one that missed: attainment
is given of the admitted and of all requests, and the verdict is on all of them.

A steady-state open-loop run (plan/load.py) measures a window: latencies of the requests sent in
it, throughput as the output tokens produced during it over its length, and `offered_tok_s`, the
output tokens those requests asked for over the same length. A deployment that produces less
than it is offered is overloaded: its queue grows with the run and its latencies never settle.
"""

from __future__ import annotations

import math
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
    num_preemptions: int
    offered_tok_s: float | None = None  # open loop: output tokens asked for per second
    is_overloaded: bool = False  # open loop: produced less than was sent in the window
    num_refused: int = 0  # latency promises: refused at once or expired in the queue
    goodput_req_s: float | None = None  # requests/s within every target
    goodput_tok_s: float | None = None  # their output tokens/s
    slo_attainment: float | None = None  # share of all requests (refused too) within every target
    slo_attainment_admitted: float | None = None  # share of the requests served
    meets_slo: bool | None = None

    @property
    def refused_share(self) -> float:
        return self.num_refused / max(self.num_requests + self.num_refused, 1)


def _tokens_in(rec: RequestRecord, start: float, end: float) -> float:
    """Output tokens `rec` produced in [start, end] (tokens per step averaged when a step gave
    several: accepted drafts)."""
    if not rec.token_event_s:
        return 0.0
    inside = sum(1 for t in rec.token_event_s if start <= t <= end)
    return inside * rec.output_len / len(rec.token_event_s)


def _waiting(records: Sequence[RequestRecord], t: float) -> int:
    """Requests sent by `t` that had not started (no first token) nor been refused at `t`."""

    def started_s(r: RequestRecord) -> float:
        start = r.finish_s if r.is_refused else r.first_token_s
        return math.inf if start is None else start

    return sum(1 for r in records if r.sent_s <= t < started_s(r))


def _latency_grows(records: Sequence[RequestRecord]) -> bool:
    """Whether the last quarter of the measured requests waited clearly longer than the first:
    a growing queue, rather than a window that by chance saw more arrivals than it finished."""
    done = sorted((r for r in records if r.finish_s is not None and not r.is_refused),
                  key=lambda r: r.sent_s)  # fmt: skip
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
    tokens/s the arrival rate offers on average): a run that keeps up reports these (less the
    share of tokens refused), since in the steady state a deployment that keeps up produces what
    it is offered; the window's own count differs from them only by the noise of its arrivals.
    Refused requests (latency promises) have no latencies and count as missing the SLO."""
    ended = [r for r in result.records if r.finish_s is not None]
    if measured is not None:
        ended = [r for r in ended if int(r.req_id) in measured]
    recs = [r for r in ended if not r.is_refused]
    refused = [r for r in ended if r.is_refused]
    itls_by_req = [np.diff(r.token_event_s) if len(r.token_event_s) > 1 else [] for r in recs]
    ttft = stats([r.first_token_s - r.sent_s for r in recs])
    tpot = stats([t for t in map(_tpot, recs) if t is not None])
    out_tokens = sum(r.output_len for r in recs)
    in_tokens = sum(r.prompt_len for r in recs)
    duration = max(result.duration_s, 1e-12)
    rates = (in_tokens / duration, out_tokens / duration, None, False)
    if window_s is not None:
        duration = max(window_s[1] - window_s[0], 1e-12)
        served = _served_nominal(nominal_tok_s, recs, refused)
        rates = _window_rates(result, window_s, in_tokens, out_tokens, served)
        if nominal_tok_s is not None:
            rates = (*rates[:2], nominal_tok_s[1], rates[3])  # offered: refused ones too
    in_rate, out_rate, offered, overloaded = rates
    verdict = _slo_verdict(slo, recs, itls_by_req, len(refused), duration, overloaded)
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
        num_preemptions=result.num_preemptions,
        offered_tok_s=offered,
        is_overloaded=overloaded,
        num_refused=len(refused),
        **verdict,
    )


def _served_nominal(
    nominal_tok_s: tuple[float, float] | None,
    served: Sequence[RequestRecord],
    refused: Sequence[RequestRecord],
) -> tuple[float, float] | None:
    """The nominal (input, output) tokens/s less the share of them that was refused."""
    if nominal_tok_s is None or not refused:
        return nominal_tok_s
    shares = (
        sum(getattr(r, key) for r in served)
        / max(sum(getattr(r, key) for r in (*served, *refused)), 1)
        for key in ("prompt_len", "output_len")
    )
    return tuple(n * share for n, share in zip(nominal_tok_s, shares, strict=True))


def _slo_verdict(
    slo: SLO | None,
    recs: Sequence[RequestRecord],
    itls_by_req: Sequence,
    num_refused: int,
    duration: float,
    overloaded: bool,
) -> dict:
    """Goodput, attainment and the verdict; a refused request is one that missed."""
    if slo is None:
        return {}
    ok = [
        slo.is_met(
            r.first_token_s - r.sent_s, _tpot(r), float(np.max(i)) if len(i) else None,
            r.finish_s - r.sent_s,
        )
        for r, i in zip(recs, itls_by_req, strict=True)
    ]  # fmt: skip
    attainment = sum(ok) / max(len(ok) + num_refused, 1)
    return {
        "goodput_req_s": sum(ok) / duration,
        "goodput_tok_s": sum(r.output_len for r, good in zip(recs, ok, strict=True) if good)
        / duration,
        "slo_attainment": attainment,
        "slo_attainment_admitted": sum(ok) / max(len(ok), 1),
        # An overloaded deployment misses whatever its first requests saw: its queue grows.
        "meets_slo": attainment >= slo.percentile / 100 - 1e-9 and not overloaded,
    }
