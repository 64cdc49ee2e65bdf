"""`tokenmill bench serve`: load an OpenAI-compatible server with a workload and report latency
and throughput (TTFT, TPOT, ITL, end-to-end; mean, median, p90, p99; goodput under SLOs)."""

from __future__ import annotations

import argparse
import json
import math


def add_workload_args(parser: argparse.ArgumentParser, num_prompts: int = 128) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument(
        "--workload", default="sharegpt",
        help="sharegpt | sharegpt:out=N | fixed:in=N,out=M | random:in=N,out=M,range=R",
    )  # fmt: skip
    group.add_argument("--num-prompts", type=int, default=num_prompts)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument(
        "--tokenizer", default=None,
        help="GGUF or HF folder whose tokenizer measures ShareGPT lengths (default: bundled model)",
    )  # fmt: skip


def register(kinds) -> None:
    parser = kinds.add_parser("serve", help="load an OpenAI-compatible server and time it")
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to send (default: /v1/models)")
    parser.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    parser.add_argument("--api-key", default=None)
    add_workload_args(parser)
    group = parser.add_argument_group("arrivals")
    group.add_argument("--request-rate", type=float, default=math.inf, help="req/s; inf: at once")
    group.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1: Poisson")
    group.add_argument("--max-concurrency", type=int, default=None)
    group.add_argument("--num-warmup", type=int, default=1, help="unmeasured requests first")
    group.add_argument(
        "--sweep-rates", default=None, metavar="R1,R2,..",
        help="run the workload at each rate (with --burstiness) and report R_sat, the highest "
        "rate the server keeps up with",
    )  # fmt: skip
    out = parser.add_argument_group("output")
    out.add_argument(
        "--slo", default=None, help="goodput targets, e.g. ttft=1s,tpot=100ms[,itl=..,e2e=..]"
    )
    out.add_argument("--json", default=None, help="write the result to this file")
    out.add_argument(
        "--timeline", default=None, metavar="CSV",
        help="per request, by send time: TTFT, TPOT, refused, meets the SLO (for a plot)",
    )  # fmt: skip
    out.add_argument("--per-request", action="store_true", help="include each request in JSON")
    out.add_argument("--no-progress", action="store_true")
    out.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    parser.set_defaults(func=run)


def build_workload_from_args(args: argparse.Namespace, arrivals=None):
    from tokenmill.bench.serve import open_model_info
    from tokenmill.workload import build_workload, parse_workload

    spec = parse_workload(args.workload)
    tokenizer = open_model_info(args.tokenizer).tokenizer if spec.needs_tokenizer else None
    return build_workload(spec, args.num_prompts, arrivals, tokenizer=tokenizer, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from tokenmill.bench import report
    from tokenmill.bench.serve import ServeTarget, first_model, run_load
    from tokenmill.workload import ArrivalSpec, parse_slo

    slo = parse_slo(args.slo) if args.slo else None
    if args.sweep_rates:
        return run_sweep(args, slo)
    arrivals = ArrivalSpec(args.request_rate, args.burstiness, args.max_concurrency)
    workload = build_workload_from_args(args, arrivals)
    model = args.model or first_model(args.base_url, args.api_key)
    target = ServeTarget(
        args.base_url, model, args.endpoint, args.api_key, ignore_eos=not args.no_ignore_eos
    )
    print(f"{workload.description} -> {args.base_url} ({model})", flush=True)
    load = run_load(target, workload, args.num_warmup, progress=not args.no_progress)
    metrics = report.summarize_run(load, slo)
    print(report.format_serve_markdown(metrics, f"bench serve: {model}"))
    num_refused = _report_slo(args, load, slo)
    if args.json:
        config = {**vars(args), "workload_description": workload.description}
        config.pop("func", None)
        with open(args.json, "w") as f:
            json.dump(report.serve_json(metrics, load, config, args.per_request), f, indent=2)
    return 0 if metrics.num_failed == num_refused else 1


def _report_slo(args: argparse.Namespace, load, slo) -> int:
    """Refusals, attainment and TPOT jitter (and the timeline); returns how many were refused
    (a 429 is an answer, not a failure)."""
    from tokenmill.bench.serve_slo import (
        format_slo_summary,
        is_refused,
        summarize_slo,
        write_timeline,
    )

    if slo is not None:
        print(format_slo_summary(summarize_slo(load, slo), slo))
    if args.timeline:
        write_timeline(load.results, args.timeline, slo)
    return sum(is_refused(r) for r in load.results)


def run_sweep(args: argparse.Namespace, slo) -> int:
    from tokenmill.bench.serve import ServeTarget, first_model, run_load
    from tokenmill.bench.serve_slo import format_sweep, rate_sweep, sweep_json
    from tokenmill.workload import ArrivalSpec

    rates = [float(r) for r in args.sweep_rates.split(",") if r.strip()]
    model = args.model or first_model(args.base_url, args.api_key)
    target = ServeTarget(
        args.base_url, model, args.endpoint, args.api_key, ignore_eos=not args.no_ignore_eos
    )

    def run_at(rate: float):
        arrivals = ArrivalSpec(rate, args.burstiness, args.max_concurrency)
        workload = build_workload_from_args(args, arrivals)
        print(f"{workload.description} -> {args.base_url} ({model})", flush=True)
        return run_load(target, workload, args.num_warmup, progress=not args.no_progress)

    points = rate_sweep(rates, run_at, slo)
    print(format_sweep(points))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(sweep_json(points), f, indent=2)
    return 0
