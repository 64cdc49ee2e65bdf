"""`tokenmill bench soak`: the slope fit and the verdict on synthetic samples, the request mix,
and one short soak against a real `tokenmill serve` with clients leaving early."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys

import pytest

from tests.server_fixtures import REPO_ROOT
from tokenmill.bench.soak import (
    SoakConfig,
    SoakSample,
    fit_slope_per_min,
    parse_gauges,
    parse_process_metrics,
    read_process_memory,
    summarize,
)
from tokenmill.bench.soak_clients import ClientMix, SoakCounts, build_body, draw_request


def _samples(rss_at, minutes: float = 60, every_s: float = 10) -> list[SoakSample]:
    times = [i * every_s for i in range(int(minutes * 60 / every_s) + 1)]
    return [
        SoakSample(t, "run", rss_at(t), rss_at(t) - 500, 40, 900, 48, 0, 0.5, 0, 0, 0)
        for t in times
    ]


def _warmup_then(slope_mb_per_min: float):
    # 1,000 MB of growth in the first 5 minutes, then a steady slope
    def rss(t: float) -> float:
        if t < 300:
            return 1000 + 1000 * t / 300
        return 2000 + slope_mb_per_min * (t - 300) / 60

    return rss


def test_slope_is_fitted_after_warmup_only():
    points = [(s.t_s, s.rss_mb) for s in _samples(_warmup_then(1.55))]
    assert fit_slope_per_min(points, from_s=300) == pytest.approx(1.55)
    assert fit_slope_per_min(points, from_s=0) > 5  # the warm-up would swamp it


def test_slope_through_noise():
    rng = random.Random(0)
    points = [(t * 10.0, 2000 + 0.05 * t * 10 / 60 + rng.gauss(0, 1.0)) for t in range(360)]
    assert fit_slope_per_min(points, from_s=300) == pytest.approx(0.05, abs=0.02)


def test_slope_needs_two_distinct_times():
    assert fit_slope_per_min([], 0) is None
    assert fit_slope_per_min([(400.0, 1.0)], 300) is None
    assert fit_slope_per_min([(400.0, 1.0), (400.0, 2.0)], 300) is None
    assert fit_slope_per_min([(100.0, 1.0), (200.0, 2.0), (400.0, 3.0)], 300) is None


def test_summary_passes_a_flat_clean_soak():
    samples = _samples(_warmup_then(0.05))
    samples.append(SoakSample(3605, "grace", 1400, 900, 40, 900, 9, 0, 0.1, 0, 0, 0))
    samples.append(SoakSample(3700, "drain", 1500, 1000, 40, 900, 0, 0, 0, 0, 0, 0))
    s = summarize(samples, SoakCounts(num_sent=10, num_ok=10), SoakConfig(), is_idle_after=True)
    assert s.slope_mb_per_min == pytest.approx(0.05)  # grace and drain are left out
    assert s.rss_start_mb == 1000 and s.rss_after_warmup_mb == 2000
    assert s.rss_end_mb == pytest.approx(2002.75) and s.rss_after_drain_mb == 1500
    assert s.rss_peak_mb == pytest.approx(2002.75)
    assert s.is_slope_met and s.is_pass


def test_summary_fails_on_growth_errors_or_busy_gauges():
    cfg = SoakConfig()
    growing = summarize(_samples(_warmup_then(1.55)), SoakCounts(), cfg, is_idle_after=True)
    assert not growing.is_slope_met and not growing.is_pass
    flat = _samples(_warmup_then(0.0))
    errors = SoakCounts(num_errors=1, errors=["HTTP 500"])
    assert not summarize(flat, errors, cfg, is_idle_after=True).is_pass
    assert not summarize(flat, SoakCounts(), cfg, is_idle_after=False).is_pass
    assert summarize(flat, SoakCounts(), cfg, is_idle_after=True).is_pass
    short = summarize(flat[:20], SoakCounts(), cfg, is_idle_after=True)  # ended in the warm-up
    assert short.slope_mb_per_min is None and not short.is_pass


def test_request_mix_follows_the_fractions():
    mix = ClientMix(disconnect_fraction=0.3, stream_fraction=0.5, sampled_fraction=0.5,
                    max_tokens=100)  # fmt: skip
    rng = random.Random(0)
    reqs = [draw_request(rng, [("a", 500), ("b", 20)], mix) for _ in range(4000)]
    leaving = [r for r in reqs if r.leave_after_chunks is not None or r.leave_after_s is not None]
    assert len(leaving) / len(reqs) == pytest.approx(0.3, abs=0.03)
    assert sum(r.is_stream for r in reqs) / len(reqs) == pytest.approx(0.5, abs=0.03)
    assert sum(r.temperature > 0 for r in reqs) / len(reqs) == pytest.approx(0.5, abs=0.03)
    assert {r.max_tokens for r in reqs} == {100, 20}
    assert all(r.leave_after_chunks is None for r in reqs if not r.is_stream)
    assert all(r.leave_after_s is None for r in reqs if r.is_stream)
    body = build_body("m", reqs[0])
    assert body["messages"][0]["role"] == "user" and body["stream"] == reqs[0].is_stream


def test_metrics_text_is_parsed():
    text = (
        '# HELP tokenmill:num_requests_running x\n'
        'tokenmill:num_requests_running{model_name="m"} 3.0\n'
        'tokenmill:kv_cache_usage_perc{model_name="m"} 0.25\n'
        'process_resident_memory_bytes 1.5e+09\n'
    )  # fmt: skip
    gauges = parse_gauges(text)
    assert gauges["num_running"] == 3 and gauges["kv_usage"] == 0.25
    assert gauges["num_waiting"] != gauges["num_waiting"]  # NaN: absent
    assert parse_process_metrics(text) == {"process_resident_memory_bytes": 1.5e9}


def test_process_memory_of_this_process():
    memory = read_process_memory(os.getpid())
    assert 10 < memory.rss_mb < 100_000 and 0 < memory.rss_anon_mb <= memory.rss_mb
    assert memory.num_threads >= 1 and memory.num_mappings > 10


def test_short_soak_against_a_real_server(tmp_path):
    out = tmp_path / "soak"
    cmd = [sys.executable, "-m", "tokenmill.cli.main", "bench", "soak", "--minutes", "0.2",
           "--warmup-minutes", "0.05", "--concurrency", "4", "--sample-seconds", "0.5",
           "--num-prompts", "32", "--max-tokens", "32", "--disconnect-fraction", "0.5",
           "--grace-seconds", "10", "--drain-seconds", "20", "--max-slope", "1e9",
           "--out", str(out), "--", "--max-num-seqs", "8"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RSS slope after warm-up" in proc.stdout and "PASS" in proc.stdout
    data = json.loads((out / "summary.json").read_text())
    s, counts = data["summary"], data["summary"]["counts"]
    assert data["is_pass"] and s["is_idle_after"]
    assert counts["num_errors"] == 0, counts["errors"]
    assert counts["num_ok"] > 0 and counts["num_disconnects"] > 0
    assert counts["num_sent"] >= counts["num_ok"] + counts["num_disconnects"]
    assert s["slope_mb_per_min"] is not None and s["rss_start_mb"] > 50
    with open(out / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == s["num_samples"] >= 12
    assert rows[-1]["phase"] == "drain" and float(rows[-1]["num_running"]) == 0
    assert max(float(r["num_running"]) for r in rows) > 0  # the samples saw the load
    assert (out / "server.log").exists()
