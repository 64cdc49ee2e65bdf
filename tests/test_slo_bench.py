"""The client side of latency promises: refusals are answers, attainment and jitter are counted
over the admitted, and the rate sweep's R_sat is the last rate the server kept up with."""

from __future__ import annotations

import csv

import pytest

from tokenmill.bench.serve import LoadRun, RequestResult
from tokenmill.bench.serve_slo import (
    SweepPoint,
    rate_sweep,
    saturation_rate,
    summarize_slo,
    sweep_point,
    write_timeline,
)
from tokenmill.workload import ArrivalSpec
from tokenmill.workload.slo import SLO

SLO_2S = SLO(ttft_s=2.0, tpot_s=0.1)


def served(ttft_s, tpot_s, n=11, start=0.0):
    latency = ttft_s + tpot_s * (n - 1)
    return RequestResult(True, 8, n, n, start_s=start, ttft_s=ttft_s, latency_s=latency)


def refused(start=0.0):
    return RequestResult(False, 8, 0, 11, start_s=start, error='HTTP 429: {"error": ...}')


def test_summary_counts_refusals_attainment_and_jitter():
    results = [served(0.5, 0.05), served(0.5, 0.06), served(3.0, 0.05), refused(), refused()]
    s = summarize_slo(LoadRun(results, duration_s=2.0, max_in_flight=3), SLO_2S)
    assert (s.num_requests, s.num_refused, s.num_admitted) == (5, 2, 3)
    assert s.admitted_meeting_slo == pytest.approx(2 / 3)
    assert s.all_meeting_slo == pytest.approx(2 / 5)
    assert s.goodput == pytest.approx(1.0)
    assert s.tpot_p50_ms == pytest.approx(50.0) and s.tpot_jitter == pytest.approx(59.8 / 50)


def test_timeline_rows_are_in_send_order(tmp_path):
    path = tmp_path / "timeline.csv"
    write_timeline([served(0.5, 0.05, start=1.0), refused(start=0.5)], str(path), SLO_2S)
    rows = list(csv.DictReader(path.open()))
    assert [(r["start_s"], r["refused"], r["meets"]) for r in rows] == [
        ("0.500", "1", "0"),
        ("1.000", "0", "1"),
    ]
    assert rows[1]["tpot_ms"] == "50.00"


def test_r_sat_is_the_throughput_at_saturation():
    def run_at(rate):  # 30 requests sent at `rate`; the server serves one at a time, 3 req/s
        free, results = 0.0, []
        for i in range(30):
            sent = i / rate
            begin = max(sent, free)
            free = begin + 1 / 3
            results.append(served(free - sent - 0.1, 0.01, start=sent))
        return LoadRun(results, duration_s=free, max_in_flight=1)

    points = rate_sweep([4.0, 1.0, 2.0, 3.0, 6.0], run_at)
    assert [p.offered_rate for p in points] == [1.0, 2.0, 3.0, 4.0, 6.0]
    assert saturation_rate(points) == pytest.approx(3.0)
    assert saturation_rate([SweepPoint(1.0, 0.5, 0, None, 1.0)]) == 0.5
    assert saturation_rate([SweepPoint(1.0, 0.99, 0, None, 1.0)]) is None  # sweep higher
    # A short run kept up with though each request takes 2 s: 5 requests at 1 req/s finish 1 s
    # apart (5 / duration would say 0.83 req/s).
    short = LoadRun([served(1.0, 0.1, start=float(i)) for i in range(5)], 6.0, 1)
    assert sweep_point(1.0, short, None).keeps_up


def test_completion_rate_leaves_out_the_drain():
    """A server finishing 2 req/s while backlogged, then three long replies alone for 20 s:
    its rate at saturation is 2, not the 1.0 that the whole span gives."""
    finishes = [0.5 * i for i in range(57)] + [38.0, 43.0, 48.0]
    results = [served(0.1, 0.0, n=1, start=f - 0.1) for f in finishes]
    point = sweep_point(3.0, LoadRun(results, 48.0, 32), None)
    assert point.completed_rate == pytest.approx(2.0)
    assert not point.keeps_up
    two = LoadRun([served(0.1, 0.0, n=1, start=t) for t in (0.0, 0.5)], 0.6, 1)
    assert sweep_point(2.0, two, None).completed_rate == pytest.approx(2.0)  # not 0


def test_bursty_arrivals_keep_the_mean_rate_and_cluster():
    even = ArrivalSpec(rate=4.0, burstiness=1.0).offsets(2000, seed=1)
    bursty = ArrivalSpec(rate=4.0, burstiness=0.25).offsets(2000, seed=1)
    assert bursty[-1] / 2000 == pytest.approx(0.25, rel=0.15)  # mean gap 1 / rate

    def gap_cv(times):
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        mean = sum(gaps) / len(gaps)
        return (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean

    # gamma(shape k) gaps have a CV of 1 / sqrt(k): 1 for Poisson, 2 for burstiness 0.25.
    assert gap_cv(even) == pytest.approx(1.0, rel=0.1)
    assert gap_cv(bursty) == pytest.approx(2.0, rel=0.15)
