"""Issue 14's benchmark in one run: latency promises under bursty overload, against FCFS and
llama-server on identical arrivals.

    python -m tokenmill.bench.slo_bench --num-prompts 80 --sweep-prompts 40 --sweep-rates 0.5,1,1.5,2

  sweep   tokenmill with the policy off, ShareGPT at each --sweep-rates (Poisson unless
          --sweep-burstiness): R_sat, its throughput at saturation (serve_slo.py). --r-sat
          skips the sweep.
  high    one schedule at 1.5 x R_sat, gamma arrivals with --burstiness (vLLM's parameter)
  low     one at 0.8 x R_sat from the same seed: the same prompts and the same bursts, the
          gaps stretched by 1.5 / 0.8 (gamma gaps scale with 1 / rate)
Each schedule runs against every --servers entry, a fresh server per run (no prompt cache
carries over): policy (tokenmill --slo S --slo-policy reject), paced (the same with
--slo-max-jitter --max-jitter: bounded jitter), fcfs (tokenmill --slo-policy off)
and llama.cpp (llama-server on the same GGUF, --parallel = --max-num-seqs, its own KV stream of
2048 tokens per slot; it has no 429, so it admits everything). Prints a table per rate
with issue 14's targets; writes timeline CSVs, a plot per rate and slo.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tokenmill.bench import report
from tokenmill.bench.serve import LoadRun, RequestResult, ServeTarget, first_model, run_load
from tokenmill.bench.serve_slo import (
    FCFS,
    LLAMA,
    PACED,
    POLICY,
    PROMISING,
    SloSummary,
    format_rate_table,
    format_sweep,
    overload_targets,
    rate_sweep,
    saturation_rate,
    summarize_slo,
    sweep_json,
    underload_targets,
    write_timeline,
)
from tokenmill.workload import ArrivalSpec, Workload, WorkloadRequest, build_workload, parse_slo

PARTS = ("sweep", "high", "low")
SERVERS = (POLICY, PACED, FCFS, LLAMA)
SWEEP_SEED_OFFSET = 100  # sweep points draw other prompts than the schedules


@dataclass(frozen=True)
class SloBenchConfig:
    model: str  # the GGUF every server loads
    out_dir: Path
    slo: str = "ttft=2s,tpot=100ms"
    workload: str = "sharegpt"  # sharegpt:out=N caps every output (for smoke runs)
    num_prompts: int = 80
    sweep_prompts: int = 40
    sweep_rates: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    sweep_burstiness: float = 1.0
    burstiness: float = 0.5
    low_burstiness: float | None = None  # the low schedule's (None: burstiness)
    high_factor: float = 1.5
    low_factor: float = 0.8
    r_sat: float | None = None  # given: no sweep
    seed: int = 0
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    kv_cache_memory_gib: float = 2.0
    max_jitter: float = 1.5  # the paced server's --slo-max-jitter
    slo_policy: str = "reject"  # the promising servers' --slo-policy: reject | queue
    tpot_share: float | None = None  # their --slo-tpot-share (None: the server's default)
    ctx_per_slot: int = 2048  # ShareGPT's longest prompt + output (workload/sharegpt.py)
    parts: tuple[str, ...] = PARTS  # schedules run in this order
    servers: tuple[str, ...] = SERVERS
    low_servers: tuple[str, ...] | None = None  # the low schedule's (None: --servers)


def tokenmill_args(cfg: SloBenchConfig, server: str) -> list[str]:
    args = [
        cfg.model, "--quantization", "gguf", "--max-num-seqs", str(cfg.max_num_seqs),
        "--max-num-batched-tokens", str(cfg.max_num_batched_tokens),
        "--kv-cache-memory", str(cfg.kv_cache_memory_gib), "--max-queue", "4096",
    ]  # fmt: skip
    if server in PROMISING:
        args += ["--slo", cfg.slo, "--slo-policy", cfg.slo_policy]
        if cfg.tpot_share is not None:
            args += ["--slo-tpot-share", f"{cfg.tpot_share:g}"]
        return args + ["--slo-max-jitter", f"{cfg.max_jitter:g}"] if server == PACED else args
    return [*args, "--slo-policy", "off"]


def open_server(cfg: SloBenchConfig, server: str, log_name: str):
    if server == LLAMA:
        from tokenmill.bench.llamacpp import LlamaServer, ensure_built

        return LlamaServer(ensure_built(), cfg.model, cfg.max_num_seqs, cfg.ctx_per_slot)
    from tokenmill.bench.serve_process import ServeProcess

    return ServeProcess(tokenmill_args(cfg, server), cfg.out_dir / f"{log_name}.log")


WARMUP = Workload((WorkloadRequest(None, 16, 8),), None, "one short warm-up request")


def run_on(cfg: SloBenchConfig, server: str, workload: Workload, log_name: str) -> LoadRun:
    """A fresh `server`, one unmeasured warm-up request, then `workload`; a tokenmill server's
    /metrics kept beside its log, and a promising server's refusals by reason printed."""
    with open_server(cfg, server, log_name) as handle:
        target = ServeTarget(handle.base_url, first_model(handle.base_url))
        # Not run_load's own warm-up: that raises when the policy refuses the warm-up request.
        run_load(target, WARMUP, num_warmup=0, progress=False)
        run = run_load(target, workload, num_warmup=0, progress=False)
        if server != LLAMA:
            import httpx

            # Kept: the engine's own view (its SLO counters, TTFT histogram, predicted-minus-
            # measured step time) beside the client's timeline.
            text = httpx.get(handle.base_url + "/metrics", timeout=10).text
            (cfg.out_dir / f"{log_name}.metrics.txt").write_text(text)
        if server in PROMISING:
            print(f"  refused by reason: {refusals(text)}", flush=True)
        return run


def refusals(metrics_text: str) -> dict[str, float]:
    """{reason: requests refused} from a tokenmill /metrics text."""
    found = re.findall(r'^tokenmill:slo_refused_total\{[^}]*reason="([^"]+)"[^}]*\} (\S+)$',
                       metrics_text, re.M)  # fmt: skip
    return {reason: float(value) for reason, value in found}


def make_schedules(cfg: SloBenchConfig, r_sat: float, tokenizer) -> dict[str, Workload]:
    """{"high": 1.5 x R_sat, "low": 0.8 x R_sat} in --parts order: ShareGPT with gamma
    arrivals, one seed."""
    factors = {"high": cfg.high_factor, "low": cfg.low_factor}
    burstiness = {"high": cfg.burstiness, "low": cfg.low_burstiness or cfg.burstiness}
    return {
        label: build_workload(
            cfg.workload,
            cfg.num_prompts,
            ArrivalSpec(factors[label] * r_sat, burstiness[label]),
            tokenizer=tokenizer,
            seed=cfg.seed,
        )
        for label in cfg.parts
        if label in factors
    }


def find_r_sat(cfg: SloBenchConfig, tokenizer, record: dict) -> float:
    """Sweep tokenmill with the policy off: R_sat, its throughput at saturation (the highest
    swept rate when it kept up with every one)."""
    runs: dict[float, LoadRun] = {}
    rate_index = {rate: i for i, rate in enumerate(sorted(cfg.sweep_rates))}
    with open_server(cfg, FCFS, "sweep") as handle:
        target = ServeTarget(handle.base_url, first_model(handle.base_url))

        def run_at(rate: float) -> LoadRun:
            # One server for every point; each point its own prompts (seed), so none is cached.
            arrivals = ArrivalSpec(rate, cfg.sweep_burstiness)
            seed = cfg.seed + SWEEP_SEED_OFFSET + rate_index[rate]
            workload = build_workload(
                cfg.workload, cfg.sweep_prompts, arrivals, tokenizer=tokenizer, seed=seed
            )
            print(f"sweep: {workload.description}", flush=True)
            runs[rate] = run_load(target, workload, num_warmup=1, progress=False)
            return runs[rate]

        points = rate_sweep(cfg.sweep_rates, run_at, parse_slo(cfg.slo))
    print(format_sweep(points))
    r_sat = saturation_rate(points)
    if r_sat is None:
        r_sat = max(cfg.sweep_rates)
        print(
            f"kept up with every swept rate: R_sat := the highest, {r_sat:g} req/s (sweep higher)"
        )
    else:
        print(f"R_sat = {r_sat:.3f} req/s: its throughput at saturation")
    lowest = min(runs)
    print(low_load_latency(lowest, runs[lowest]))
    record["sweep"] = {**sweep_json(points), "r_sat_used": r_sat}
    return r_sat


def low_load_latency(rate: float, run: LoadRun) -> str:
    """What the lowest swept rate gives every request: the floor any SLO must sit above."""
    done = [r for r in run.results if r.ok]
    ttft = [r.ttft_s * 1e3 for r in done]
    tpot = [r.tpot_s * 1e3 for r in done if r.tpot_s is not None]

    def pct(values: list[float], q: float) -> str:
        return f"{np.percentile(values, q):.0f}" if values else "-"

    return (
        f"at {rate:g} req/s (lowest swept rate), policy off: TTFT p50 {pct(ttft, 50)} / p99 "
        f"{pct(ttft, 99)} ms, TPOT p50 {pct(tpot, 50)} / p99 {pct(tpot, 99)} ms"
    )


def result_json(r: RequestResult) -> dict:
    row = asdict(r)
    row["itl_max_s"] = max(row.pop("itl_s"), default=None)
    row["tpot_s"] = r.tpot_s
    return row


def summary_json(s: SloSummary, run: LoadRun) -> dict:
    return {**asdict(s), "tpot_jitter": s.tpot_jitter, "duration_s": run.duration_s,
            "max_in_flight": run.max_in_flight}  # fmt: skip


def finite(value):
    """JSON without Infinity: an infinite ratio (the baseline met nothing) is written "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def write_json(cfg: SloBenchConfig, record: dict) -> None:
    (cfg.out_dir / "slo.json").write_text(json.dumps(finite(record), indent=1, default=str))


def run_schedule(cfg: SloBenchConfig, label: str, workload: Workload, record: dict) -> str:
    """Every server on one schedule: timelines, the plot, the table with the targets."""
    from tokenmill.bench.slo_plot import plot_timelines

    slo = parse_slo(cfg.slo)
    runs: dict[str, LoadRun] = {}
    summaries: dict[str, SloSummary] = {}
    entry = record["runs"].setdefault(label, {})
    servers = cfg.low_servers if label == "low" and cfg.low_servers else cfg.servers
    for server in servers:
        print(f"{label}: {server} <- {workload.description}", flush=True)
        started = time.monotonic()
        runs[server] = run_on(cfg, server, workload, f"{label}-{server}")
        summaries[server] = summarize_slo(runs[server], slo)
        print(f"  {time.monotonic() - started:.0f} s", flush=True)
        write_timeline(runs[server].results, str(cfg.out_dir / f"timeline-{label}-{server}.csv"),
                       slo)  # fmt: skip
        entry[server] = {**summary_json(summaries[server], runs[server]),
                         "results": [result_json(r) for r in runs[server].results]}  # fmt: skip
        write_json(cfg, record)
    title = f"{label}: {workload.description}; SLO {slo.describe()}"
    plot = cfg.out_dir / f"timeline-{label}.png"
    plot_timelines({name: run.results for name, run in runs.items()}, slo, plot, title)
    targets_of = overload_targets if label == "high" else underload_targets
    targets = [
        t for server in PROMISING if server in summaries for t in targets_of(summaries, server)
    ]
    record["targets"][label] = [{**asdict(t), "is_met": t.is_met} for t in targets]
    write_json(cfg, record)
    return format_rate_table(title, summaries, targets)


def run(cfg: SloBenchConfig) -> str:
    """The whole benchmark; returns the markdown it also writes to slo.md."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    record: dict = {"config": asdict(cfg), "machine": report.machine_info(), "runs": {},
                    "targets": {}, "schedules": {}}  # fmt: skip
    from tokenmill.bench.serve import open_model_info

    tokenizer = open_model_info(cfg.model).tokenizer
    r_sat = find_r_sat(cfg, tokenizer, record) if "sweep" in cfg.parts else cfg.r_sat
    if r_sat is None:
        raise SystemExit("without the sweep part, give --r-sat")
    record["r_sat"] = r_sat
    tables = [f"R_sat = {r_sat:.3f} req/s; SLO {parse_slo(cfg.slo).describe()}"]
    for label, workload in make_schedules(cfg, r_sat, tokenizer).items():
        arrivals = [r.arrival_s for r in workload.requests]
        record["schedules"][label] = {"description": workload.description, "arrival_s": arrivals}
        tables.append(run_schedule(cfg, label, workload, record))
        print(tables[-1], flush=True)
    text = "\n\n".join(tables) + "\n"
    (cfg.out_dir / "slo.md").write_text(text)
    write_json(cfg, record)
    return text


def parse_args(argv: list[str] | None = None) -> SloBenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = SloBenchConfig("", Path())
    today = time.strftime("%Y-%m-%d")
    parser.add_argument("--out", type=Path, default=Path(f"docs/results/{today}-slo"))
    parser.add_argument("--model", default=None, help="GGUF (default: the bundled model)")
    parser.add_argument("--slo", default=default.slo)
    parser.add_argument("--workload", default=default.workload, help="sharegpt[:out=N]")
    parser.add_argument("--num-prompts", type=int, default=default.num_prompts)
    parser.add_argument("--sweep-prompts", type=int, default=default.sweep_prompts)
    parser.add_argument("--sweep-rates", default=",".join(f"{r:g}" for r in default.sweep_rates))
    parser.add_argument("--sweep-burstiness", type=float, default=default.sweep_burstiness)
    parser.add_argument("--burstiness", type=float, default=default.burstiness)
    parser.add_argument(
        "--low-burstiness", type=float, default=None,
        help="the low schedule's gamma burstiness (default: --burstiness; 1 = Poisson)",
    )  # fmt: skip
    parser.add_argument("--high-factor", type=float, default=default.high_factor)
    parser.add_argument("--low-factor", type=float, default=default.low_factor)
    parser.add_argument("--r-sat", type=float, default=None, help="skip the sweep: use this")
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--max-num-seqs", type=int, default=default.max_num_seqs)
    parser.add_argument("--max-jitter", type=float, default=default.max_jitter, help="paced's")
    parser.add_argument("--tpot-share", type=float, default=None, help="promising servers'")
    parser.add_argument("--slo-policy", default=default.slo_policy, choices=("reject", "queue"),
                        help="the promising servers' (queue: a request waits while it can still "
                        "meet its TTFT)")  # fmt: skip
    parser.add_argument("--kv-cache-memory", type=float, default=default.kv_cache_memory_gib)
    parser.add_argument("--parts", default=",".join(PARTS), help="of: " + ",".join(PARTS))
    parser.add_argument("--servers", default=",".join(SERVERS), help="of: " + ",".join(SERVERS))
    parser.add_argument("--low-servers", default=None, help="the low schedule's (--servers)")
    args = parser.parse_args(argv)
    from tokenmill.loader.default_model import default_model_path

    parts = tuple(p for p in args.parts.split(",") if p)
    servers = tuple(s for s in args.servers.split(",") if s)
    low_servers = tuple(s for s in (args.low_servers or "").split(",") if s) or None
    checked = (("part", parts, PARTS), ("server", servers, SERVERS),
               ("server", low_servers or (), SERVERS))  # fmt: skip
    for name, given, allowed in checked:
        if bad := [g for g in given if g not in allowed]:
            parser.error(f"unknown {name} {bad}; choose from {','.join(allowed)}")
    parse_slo(args.slo)  # a malformed SLO fails before any server starts
    return SloBenchConfig(
        model=args.model or str(default_model_path()), out_dir=args.out, slo=args.slo,
        workload=args.workload,
        num_prompts=args.num_prompts, sweep_prompts=args.sweep_prompts,
        sweep_rates=tuple(float(r) for r in args.sweep_rates.split(",") if r),
        sweep_burstiness=args.sweep_burstiness, burstiness=args.burstiness,
        low_burstiness=args.low_burstiness,
        high_factor=args.high_factor, low_factor=args.low_factor, r_sat=args.r_sat,
        seed=args.seed, max_num_seqs=args.max_num_seqs,
        kv_cache_memory_gib=args.kv_cache_memory, parts=parts, servers=servers,
        low_servers=low_servers,
        max_jitter=args.max_jitter, slo_policy=args.slo_policy, tpot_share=args.tpot_share,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
