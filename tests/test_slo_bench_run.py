"""Issue 14's benchmark, its pure parts: the per-rate table, goodput ratios and targets from
synthetic results, the timeline plot, and one arrival schedule per seed for every server."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tokenmill.bench.serve import LoadRun, RequestResult
from tokenmill.bench.serve_slo import (
    FCFS,
    LLAMA,
    POLICY,
    Target,
    format_rate_table,
    goodput_ratio,
    overload_targets,
    summarize_slo,
    underload_targets,
)
from tokenmill.bench.slo_bench import (
    SloBenchConfig,
    finite,
    make_schedules,
    parse_args,
    tokenmill_args,
)
from tokenmill.bench.slo_plot import plot_timelines
from tokenmill.workload.slo import SLO

SLO_2S = SLO(ttft_s=2.0, tpot_s=0.1)


def served(ttft_s: float, tpot_s: float, start: float = 0.0, n: int = 11) -> RequestResult:
    latency = ttft_s + tpot_s * (n - 1)
    return RequestResult(True, 8, n, n, start_s=start, ttft_s=ttft_s, latency_s=latency)


def refused(start: float = 0.0) -> RequestResult:
    return RequestResult(False, 8, 0, 11, start_s=start, error="HTTP 429: slo_unattainable")


def overload_runs() -> dict[str, LoadRun]:
    # 10 requests each over 10 s. policy: 6 admitted, all within the SLO, 4 refused;
    # FCFS: all admitted, 2 within it; llama-server: all admitted, 1 within it.
    policy = [served(0.5, 0.05 + 0.001 * i, start=i) for i in range(6)]
    policy += [refused(start=6 + i) for i in range(4)]
    fcfs = [served(0.5, 0.05, start=0), served(1.0, 0.08, start=1)]
    fcfs += [served(5.0 + i, 0.2, start=2 + i) for i in range(8)]
    llama = [served(0.5, 0.09, start=0)] + [served(9.0, 0.3, start=1 + i) for i in range(9)]
    return {POLICY: LoadRun(policy, 10.0, 6), FCFS: LoadRun(fcfs, 10.0, 10),
            LLAMA: LoadRun(llama, 10.0, 10)}  # fmt: skip


def test_overload_table_ratios_and_targets():
    summaries = {name: summarize_slo(run, SLO_2S) for name, run in overload_runs().items()}
    policy = summaries[POLICY]
    assert (policy.num_admitted, policy.num_refused) == (6, 4)
    assert policy.admitted_meeting_slo == 1.0 and policy.all_meeting_slo == pytest.approx(0.6)
    assert goodput_ratio(policy, summaries[FCFS]) == pytest.approx(3.0)
    assert goodput_ratio(policy, summaries[LLAMA]) == pytest.approx(6.0)
    targets = {t.name: t for t in overload_targets(summaries)}
    assert targets["goodput(policy)/goodput(FCFS)"].is_met is True
    assert targets["goodput(policy)/goodput(llama-server)"].is_met is True
    assert targets["admitted meeting SLO (policy)"].is_met is True
    assert targets["TPOT p99/p50 (policy)"].value == pytest.approx(54.95 / 52.5)
    table = format_rate_table("high", summaries, list(targets.values()))
    assert "| policy | 6 | 4 | 100.0 | 60.0 | 0.600 |" in table
    assert "goodput(policy)/goodput(FCFS) = 3.00 (target >= 2): met" in table


def test_targets_missed_and_not_run():
    runs = overload_runs()
    bad = [served(0.5, 0.05, start=i) for i in range(5)] + [served(3.0, 0.2, start=5)]
    summaries = {POLICY: summarize_slo(LoadRun(bad, 10.0, 6), SLO_2S),
                 FCFS: summarize_slo(runs[FCFS], SLO_2S)}  # fmt: skip
    targets = {t.name: t for t in overload_targets(summaries)}
    assert targets["goodput(policy)/goodput(FCFS)"].value == pytest.approx(2.5)
    assert targets["admitted meeting SLO (policy)"].is_met is False  # 5 of 6
    assert targets["TPOT p99/p50 (policy)"].is_met is False  # 200 ms vs 50 ms
    assert targets["goodput(policy)/goodput(llama-server)"].is_met is None
    low = {t.name: t for t in underload_targets(summaries)}
    assert low["all meeting SLO (policy)"].value == pytest.approx(5 / 6)
    assert low["all meeting SLO (policy)"].is_met is False
    table = format_rate_table("low", summaries, list(low.values()))
    assert "goodput(policy)/goodput(FCFS) = 2.50 (no target at this rate)" in table
    assert "all meeting SLO (policy) = 0.833 (target >= 0.95): MISSED" in table
    # A value just short of its bound is shown with the digit that separates them.
    near = Target("admitted meeting SLO (paced)", 455 / 460, 0.99)
    assert near.describe() == "admitted meeting SLO (paced) = 0.989 (target >= 0.99): MISSED"


def test_ratio_against_a_baseline_that_met_nothing_is_infinite_and_json_safe():
    nothing = summarize_slo(LoadRun([served(9.0, 0.5)], 10.0, 1), SLO_2S)
    some = summarize_slo(LoadRun([served(0.5, 0.05)], 10.0, 1), SLO_2S)
    assert goodput_ratio(some, nothing) == math.inf
    assert goodput_ratio(nothing, nothing) == 0.0  # a policy that serves nothing misses
    assert goodput_ratio(some, None) is None  # not run
    assert finite({"r": [math.inf, 1.5]}) == {"r": ["inf", 1.5]}


def test_plot_writes_a_png(tmp_path: Path):
    runs = {name: run.results for name, run in overload_runs().items()}
    path = plot_timelines(runs, SLO_2S, tmp_path / "timeline.png", "high")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


class WordEncoder:
    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


def test_same_seed_same_schedules_and_low_is_high_stretched(tmp_path: Path):
    cfg = SloBenchConfig("model.gguf", tmp_path, num_prompts=20, burstiness=0.5)
    first = make_schedules(cfg, 2.0, WordEncoder())
    second = make_schedules(cfg, 2.0, WordEncoder())
    assert first == second  # every server gets these exact requests at these exact offsets
    high, low = first["high"].requests, first["low"].requests
    assert [r.prompt for r in high] == [r.prompt for r in low]
    stretch = cfg.high_factor / cfg.low_factor
    assert [r.arrival_s * stretch for r in high] == pytest.approx([r.arrival_s for r in low])
    other = make_schedules(
        SloBenchConfig("m", tmp_path, num_prompts=20, seed=1), 2.0, WordEncoder()
    )
    assert [r.arrival_s for r in other["high"].requests] != [r.arrival_s for r in high]
    poisson_low = parse_args(["--model", "m", "--num-prompts", "20", "--low-burstiness", "1"])
    schedules = make_schedules(poisson_low, 2.0, WordEncoder())
    assert [r.arrival_s for r in schedules["low"].requests] != [r.arrival_s for r in low]
    assert [r.arrival_s for r in schedules["high"].requests] == [r.arrival_s for r in high]


def test_args_pick_parts_and_servers(tmp_path: Path):
    cfg = parse_args(["--out", str(tmp_path), "--model", "m.gguf", "--parts", "high",
                      "--servers", "policy,fcfs", "--r-sat", "1.5"])  # fmt: skip
    assert (cfg.parts, cfg.servers, cfg.r_sat) == (("high",), (POLICY, FCFS), 1.5)
    assert set(make_schedules(cfg, 1.5, WordEncoder())) == {"high"}
    assert cfg.low_servers is None  # the low schedule runs --servers
    with pytest.raises(SystemExit):
        parse_args(["--servers", "vllm"])
    both = parse_args(["--model", "m.gguf", "--parts", "low,high", "--low-servers", "paced"])
    assert list(make_schedules(both, 1.5, WordEncoder())) == ["low", "high"]  # --parts order
    assert both.low_servers == ("paced",)
    assert "reject" in tokenmill_args(both, "paced")  # the default policy
    queued = parse_args(["--model", "m.gguf", "--slo-policy", "queue"])
    assert tokenmill_args(queued, "paced")[-4:-2] == ["--slo-policy", "queue"]
    assert tokenmill_args(queued, "fcfs")[-2:] == ["--slo-policy", "off"]
    assert "--slo-tpot-share" not in tokenmill_args(queued, "paced")  # the server's default
    shared = parse_args(["--model", "m.gguf", "--tpot-share", "0.95"])
    args = tokenmill_args(shared, "policy")
    assert args[args.index("--slo-tpot-share") + 1] == "0.95"
    assert "--slo-tpot-share" not in tokenmill_args(shared, "fcfs")
    with pytest.raises(SystemExit):
        parse_args(["--low-servers", "vllm"])
