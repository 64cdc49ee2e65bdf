"""Latency promises seen from the client: refusals, attainment, jitter, and the rate sweep that
finds a server's saturation rate R_sat.

    refused    requests answered 429 (code slo_unattainable, or queue_full): told at once; or
               told by an error event that they expired in the queue (--slo-policy queue)
    admitted   requests that streamed tokens
    attainment share of the admitted, and of all requests, meeting every SLO target
    jitter     TPOT p99 / p50 of the admitted

R_sat is the server's throughput at saturation: the most requests per second it completes when
offered more than it can serve. A swept rate is kept up with when the completion rate is at
least 95% of the offered one; the completion rate is how fast requests finish between the
first and the last tenth of the finishes: a server that keeps up finishes them as they are sent,
one whose queue grows finishes them at its own service rate, and the start and the drain (a few
long replies finishing alone after the arrivals stop) are left out. (The whole span read R_sat
low: 1.54 req/s where FCFS then kept 63% of its requests in time at 2.31. With replies of very
different lengths a short run that kept up can still fall under 95%, which is why R_sat is the
completion rate reached, not the last rate that passed.)
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tokenmill.bench.report import meets_slo
from tokenmill.bench.serve import LoadRun, RequestResult
from tokenmill.workload.slo import SLO


def is_refused(result: RequestResult) -> bool:
    """Told it cannot be served: a 429, or the error event of a request that expired in the
    queue (--slo-policy queue) after its stream began."""
    return not result.ok and (
        result.error.startswith("HTTP 429") or "slo_unattainable" in result.error
    )


@dataclass(frozen=True)
class SloSummary:
    num_requests: int
    num_refused: int
    num_admitted: int
    admitted_meeting_slo: float  # share of the admitted
    all_meeting_slo: float  # share of every request sent
    goodput: float  # requests / s meeting every target
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None

    @property
    def tpot_jitter(self) -> float | None:
        """TPOT p99 / p50 of the admitted requests (bounded jitter: <= 1.5)."""
        if not self.tpot_p50_ms or self.tpot_p99_ms is None:
            return None
        return self.tpot_p99_ms / self.tpot_p50_ms


def summarize_slo(run: LoadRun, slo: SLO) -> SloSummary:
    results = run.results
    admitted = [r for r in results if r.ok]
    good = sum(meets_slo(r, slo) for r in admitted)
    tpots = [r.tpot_s * 1e3 for r in admitted if r.tpot_s is not None]
    return SloSummary(
        num_requests=len(results),
        num_refused=sum(is_refused(r) for r in results),
        num_admitted=len(admitted),
        admitted_meeting_slo=good / len(admitted) if admitted else 0.0,
        all_meeting_slo=good / len(results) if results else 0.0,
        goodput=good / run.duration_s if run.duration_s > 0 else 0.0,
        tpot_p50_ms=float(np.percentile(tpots, 50)) if tpots else None,
        tpot_p99_ms=float(np.percentile(tpots, 99)) if tpots else None,
    )


def format_slo_summary(s: SloSummary, slo: SLO) -> str:
    jitter = f"{s.tpot_jitter:.2f}" if s.tpot_jitter is not None else "n/a"
    return (
        f"- SLO {slo.describe()}: {s.num_admitted} admitted, {s.num_refused} refused; "
        f"{100 * s.admitted_meeting_slo:.1f}% of admitted and {100 * s.all_meeting_slo:.1f}% "
        f"of all meet it; goodput {s.goodput:.2f} req/s; TPOT p99/p50 {jitter}"
    )


def write_timeline(results: Sequence[RequestResult], path: str, slo: SLO | None = None) -> None:
    """One row per request, by send time: what a plot of TTFT and TPOT over time needs."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["start_s", "ok", "refused", "ttft_ms", "tpot_ms", "output_len", "meets"])
        for r in sorted(results, key=lambda r: r.start_s):
            tpot = f"{r.tpot_s * 1e3:.2f}" if r.tpot_s is not None else ""
            ttft = f"{r.ttft_s * 1e3:.2f}" if r.ok else ""
            meets = int(meets_slo(r, slo)) if slo is not None else ""
            out.writerow(
                [f"{r.start_s:.3f}", int(r.ok), int(is_refused(r)), ttft, tpot, r.output_len, meets]
            )


@dataclass(frozen=True)
class SweepPoint:
    offered_rate: float
    completed_rate: float  # how fast requests finished, the drain left out (completion_rate)
    num_refused: int
    goodput: float | None
    ttft_p50_ms: float

    @property
    def keeps_up(self) -> bool:
        return self.completed_rate >= 0.95 * self.offered_rate


def sweep_point(rate: float, run: LoadRun, slo: SLO | None) -> SweepPoint:
    done = [r for r in run.results if r.ok]
    ttfts = [r.ttft_s * 1e3 for r in done]
    good = sum(meets_slo(r, slo) for r in done) / run.duration_s if slo else None
    return SweepPoint(
        offered_rate=rate,
        completed_rate=completion_rate(done),
        num_refused=sum(is_refused(r) for r in run.results),
        goodput=good,
        ttft_p50_ms=float(np.median(ttfts)) if ttfts else float("nan"),
    )


def completion_rate(done: Sequence[RequestResult]) -> float:
    """Requests finished per second between the first and the last tenth of the finishes. The
    drain is left out: after the arrivals stop, a few long replies finish alone, and counting
    them read R_sat at 1.03 and 1.54 req/s where FCFS then kept up with more (BENCHMARKS 11)."""
    finishes = sorted(r.start_s + r.latency_s for r in done)
    lo = int(0.1 * (len(finishes) - 1))
    hi = len(finishes) - 1 - lo  # as many left out at each end: two finishes keep both
    span = finishes[hi] - finishes[lo] if hi > lo else 0.0
    return (hi - lo) / span if span > 0 else 0.0


def rate_sweep(
    rates: Sequence[float], run_at: Callable[[float], LoadRun], slo: SLO | None = None
) -> list[SweepPoint]:
    """Run the same workload at each offered rate (ascending); `run_at(rate)` sends it."""
    return [sweep_point(rate, run_at(rate), slo) for rate in sorted(rates)]


def saturation_rate(points: Sequence[SweepPoint]) -> float | None:
    """R_sat: the request rate the server completes when offered more than it can serve, its
    throughput at saturation: the highest min(offered, completed) over the sweep, once some swept
    rate was not kept up with (None: every one was; sweep higher)."""
    if all(p.keeps_up for p in points):
        return None
    return max(min(p.offered_rate, p.completed_rate) for p in points)


def format_sweep(points: Sequence[SweepPoint]) -> str:
    lines = ["| offered req/s | completed req/s | refused | goodput req/s | TTFT p50 ms |"]
    lines.append("|---|---|---|---|---|")
    for p in points:
        good = f"{p.goodput:.2f}" if p.goodput is not None else "-"
        lines.append(
            f"| {p.offered_rate:g} | {p.completed_rate:.2f} | {p.num_refused} | {good} "
            f"| {p.ttft_p50_ms:.0f} |"
        )
    r_sat = saturation_rate(points)
    lines.append(f"\nR_sat = {r_sat:g} req/s" if r_sat else "\nR_sat: below the lowest rate")
    return "\n".join(lines)


def sweep_json(points: Sequence[SweepPoint]) -> dict:
    return {"points": [asdict(p) for p in points], "r_sat": saturation_rate(points)}


# ---- issue 14's targets: the policy against FCFS and llama-server on the same arrivals ----

POLICY, PACED, FCFS, LLAMA = "policy", "paced", "fcfs", "llama.cpp"
PROMISING = (POLICY, PACED)  # the servers that make promises: the targets are theirs


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None  # None: a run it needs was not made
    bound: float
    is_upper: bool = False  # True: value <= bound, else value >= bound

    @property
    def is_met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.bound if self.is_upper else self.value >= self.bound

    def describe(self) -> str:
        status = {True: "met", False: "MISSED", None: "not run"}[self.is_met]
        # One decimal past the bound's, so a value just short of it never reads as equal.
        places = max(2, len(f"{self.bound:g}".partition(".")[2]) + 1)
        value = "-" if self.value is None else f"{self.value:.{places}f}"
        return f"{self.name} = {value} (target {'<=' if self.is_upper else '>='} {self.bound:g}): {status}"


def goodput_ratio(num: SloSummary | None, den: SloSummary | None) -> float | None:
    """num's goodput over den's (None: one was not run); inf when only num served anything
    within the SLO, 0 when num served nothing within it."""
    if num is None or den is None:
        return None
    if num.goodput == 0:
        return 0.0
    return num.goodput / den.goodput if den.goodput > 0 else math.inf


def overload_targets(runs: dict[str, SloSummary], server: str = POLICY) -> list[Target]:
    """At 1.5 x R_sat, bursty: goodput >= 2x FCFS and >= 3x llama-server, >= 99% of the admitted
    within the SLO, TPOT p99/p50 <= 1.5; for `server`, one that makes promises."""
    policy = runs.get(server)
    return [
        Target(f"goodput({server})/goodput(FCFS)", goodput_ratio(policy, runs.get(FCFS)), 2.0),
        Target(
            f"goodput({server})/goodput(llama-server)",
            goodput_ratio(policy, runs.get(LLAMA)),
            3.0,
        ),
        Target(f"admitted meeting SLO ({server})", policy and policy.admitted_meeting_slo, 0.99),
        Target(f"TPOT p99/p50 ({server})", policy and policy.tpot_jitter, 1.5, is_upper=True),
    ]


def underload_targets(runs: dict[str, SloSummary], server: str = POLICY) -> list[Target]:
    """At 0.8 x R_sat: >= 95% of all requests within the SLO (nothing servable refused), TPOT
    p99/p50 <= 1.5; the goodput ratios are shown without a target."""
    policy = runs.get(server)
    return [
        Target(f"all meeting SLO ({server})", policy and policy.all_meeting_slo, 0.95),
        Target(f"TPOT p99/p50 ({server})", policy and policy.tpot_jitter, 1.5, is_upper=True),
    ]


def format_rate_table(title: str, runs: dict[str, SloSummary], targets: list[Target]) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        f"### {title}", "",
        "| server | admitted | refused | % admitted meeting SLO | % all meeting SLO "
        "| goodput req/s | TPOT p50 ms | TPOT p99 ms | p99/p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, s in runs.items():
        lines.append(
            f"| {name} | {s.num_admitted} | {s.num_refused} | {100 * s.admitted_meeting_slo:.1f} "
            f"| {100 * s.all_meeting_slo:.1f} | {s.goodput:.3f} | {num(s.tpot_p50_ms, '.1f')} "
            f"| {num(s.tpot_p99_ms, '.1f')} | {num(s.tpot_jitter, '.2f')} |"
        )
    ratios = (("FCFS", FCFS), ("llama-server", LLAMA))
    shown = {t.name for t in targets}
    lines.append("")
    for label, name in ratios:
        key = f"goodput(policy)/goodput({label})"
        if key not in shown:
            ratio = goodput_ratio(runs.get(POLICY), runs.get(name))
            lines.append(f"- {key} = {num(ratio, '.2f')} (no target at this rate)")
    lines += [f"- {t.describe()}" for t in targets]
    return "\n".join(lines)
