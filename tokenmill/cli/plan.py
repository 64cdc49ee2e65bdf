"""`tokenmill plan`: what a model and its traffic cost on some hardware, and how fast they run.

    tokenmill plan --model llama-3.1-8b --hardware h100 --workload fixed:in=1000,out=1000 \\
                   --concurrency 32 [--slo ttft=500ms,tpot=50ms] [--json]
    tokenmill plan --model llama-3.1-70b --compare h100,h200,groq-lpu,cerebras-wse3 --rate 4
    tokenmill plan --list
    tokenmill plan --model smollm2-135m --calibrate-from trace.jsonl
    tokenmill plan calibrate [--dtype float32]          # run the engine here, fit this-machine
    tokenmill plan validate [--calibrate] [--rates 0.5,1,2,inf] [--num-prompts 48]
"""

from __future__ import annotations

import argparse
import json
import math

from tokenmill.cli import plan_calibrate, plan_validate
from tokenmill.errors import ConfigError

DEFAULT_PLOT = "plan-pareto.png"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="predict speed, chips and cost of a model and workload on hardware",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    p.add_argument("--model", help="catalogue name (see --list) or a config.json path")
    p.add_argument("--hardware", help="catalogue name (see --list)")
    p.add_argument("--compare", help="comma-separated hardware to rank (or 'all')")
    p.add_argument("--list", action="store_true", help="list known models and hardware")
    p.add_argument(
        "--workload",
        default="fixed:in=1000,out=1000",
        help="fixed:in=N,out=N | random:in=N,out=N,range=R | sharegpt[:out=N]",
    )
    p.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    p.add_argument("--rate", type=float, help="open loop: requests per second")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson)")
    p.add_argument("--num-prompts", type=int, help="requests to simulate")
    p.add_argument("--weights-dtype", default="bf16", help="fp32 | bf16 | fp16 | fp8 | int8 | int4")
    p.add_argument(
        "--kv-dtype", default=None, help="bf16 | fp16 | fp8 | int8 (default: activations)"
    )
    p.add_argument("--chips", type=int, help="chips per replica (default: the fewest that fit)")
    p.add_argument("--tp", type=int, help="tensor-parallel width")
    p.add_argument("--replicas", type=int, default=1, help="identical replicas sharing the load")
    p.add_argument("--slo", help="e.g. ttft=500ms,tpot=50ms[,itl=..,e2e=..][,pct=99]")
    p.add_argument("--spec-decode", help="speculative decoding: k=4,accept=0.7[,cost=0.05]")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-seqs", type=int, help="sequences the placement must hold KV for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-jitter", action="store_true", help="no step-time jitter on GPUs/CPUs")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument(
        "--plot", default=None, help=f"Pareto plot file for --compare ({DEFAULT_PLOT}; 'none')"
    )
    p.add_argument(
        "--calibrate-from",
        metavar="TRACE",
        help="fit this-machine to an engine step trace (JSON lines) of --model",
    )
    p.set_defaults(func=run)  # fmt: skip
    modes = p.add_subparsers(dest="plan_mode", metavar="{calibrate,validate}")
    plan_calibrate.register(modes)
    plan_validate.register(modes)


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(_list_text())
        return 0
    if not args.model:
        raise ConfigError("--model is required (see tokenmill plan --list)")
    if args.calibrate_from:
        return _calibrate(args)
    request = _plan_request(args)
    if args.compare:
        return _compare(args, request)
    if not args.hardware:
        raise ConfigError("give --hardware NAME or --compare NAME,NAME,... (see --list)")
    from tokenmill.plan.planner import run_plan
    from tokenmill.plan.report import to_json, to_text

    result = run_plan(request, _tokenizer_loader(request))
    if args.json:
        out = to_json(result)
        out["notes"] += _tokenizer_notes(request)
        print(json.dumps(out, indent=2))
    else:
        print(to_text(result))
        for note in _tokenizer_notes(request):
            print(f"{'note':<11}{note}")
    return 0


def _plan_request(args: argparse.Namespace):
    from tokenmill.perf.dtypes import Precision
    from tokenmill.plan.planner import PlanRequest
    from tokenmill.workload.slo import parse_slo

    if args.burstiness <= 0 or not math.isfinite(args.burstiness):
        raise ConfigError(f"--burstiness must be a positive number, got {args.burstiness}")
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    num_prompts = args.num_prompts
    if num_prompts is None and args.compare and args.concurrency:
        num_prompts = max(2 * args.concurrency, 32)  # many simulations: keep each short
    return PlanRequest(
        model=args.model,
        hardware=args.hardware or "h100",
        workload=args.workload,
        concurrency=args.concurrency,
        rate=args.rate,
        burstiness=args.burstiness,
        num_prompts=num_prompts,
        precision=Precision(weights=args.weights_dtype, kv=args.kv_dtype),
        chips=args.chips,
        tp=args.tp,
        replicas=args.replicas,
        slo=parse_slo(args.slo) if args.slo else None,
        spec=_parse_spec_decode(args.spec_decode) if args.spec_decode else None,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_seqs=args.kv_seqs,
        seed=args.seed,
        jitter=not args.no_jitter,
    )


def _parse_spec_decode(text: str):
    from tokenmill.plan.sim_runner import SpecDecodeConfig

    values = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or key not in ("k", "accept", "cost"):
            raise ConfigError(f"bad --spec-decode item {item!r}; use k=4,accept=0.7[,cost=0.05]")
        try:
            values[key] = float(raw)
        except ValueError:
            raise ConfigError(f"bad --spec-decode value {item!r}") from None
    if "k" not in values or "accept" not in values or values["k"] != int(values["k"]):
        raise ConfigError("--spec-decode needs an integer k= and accept=, e.g. k=4,accept=0.7")
    return SpecDecodeConfig(int(values["k"]), values["accept"], values.get("cost", 0.0))


def _tokenizer_loader(request):
    from tokenmill.workload.spec import parse_workload

    if not parse_workload(request.workload).needs_tokenizer:
        return None
    from tokenmill.plan.proxy_tokenizer import load_proxy_tokenizer

    return load_proxy_tokenizer


def _tokenizer_notes(request) -> list[str]:
    from tokenmill.plan.models import get_model
    from tokenmill.plan.proxy_tokenizer import PROXY_NAME
    from tokenmill.workload.spec import parse_workload

    if not parse_workload(request.workload).needs_tokenizer:
        return []
    if get_model(request.model).name == "smollm2-135m":
        return ["ShareGPT lengths measured with the model's own tokenizer"]
    return [f"ShareGPT lengths measured with the {PROXY_NAME} tokenizer as a proxy for the model's"]


def _compare(args: argparse.Namespace, request) -> int:
    from tokenmill.plan.compare import compare, plot_pareto
    from tokenmill.plan.hardware import THIS_MACHINE, list_hardware
    from tokenmill.plan.report import to_json

    names = [n.strip() for n in args.compare.split(",") if n.strip()]
    if names == ["all"]:
        names = [n for n in list_hardware() if n != THIS_MACHINE]
    comparison = compare(request, names, _tokenizer_loader(request))
    plot = args.plot or DEFAULT_PLOT
    title = f"{request.model}, {request.workload}, {request.precision.describe()}"
    if plot != "none" and any(e.result for e in comparison.entries):
        plot_pareto(comparison, plot, title)
    notes = _tokenizer_notes(request)
    if args.json:
        print(json.dumps({**_compare_json(comparison, plot, to_json), "notes": notes}, indent=2))
    else:
        print(_compare_text(comparison, request, plot))
        for note in notes:
            print(f"note: {note}")
    return 0


def _compare_json(comparison, plot: str, to_json) -> dict:
    results = [
        to_json(e.result) if e.result else {"hardware": e.hardware, "error": e.error}
        for e in comparison.entries
    ]
    cheapest = comparison.cheapest
    return {
        "results": results,
        "cheapest": None if cheapest is None else to_json(cheapest.result),
        "pareto": list(comparison.pareto),
        "plot": None if plot == "none" else plot,
    }


def _compare_text(comparison, request, plot: str) -> str:
    from tokenmill.plan.compare import config_label

    slo = request.slo.describe() if request.slo else "none"
    lines = [
        f"tokenmill plan --compare: {request.model}, {request.precision.describe()}; SLO {slo}",
        f"{'rank':>4}  {'best configuration tried':<32}{'tok/s/user':>11}{'TTFT p99':>10}"
        f"{'TPOT p99':>10}{'tok/s':>10}{'$/Mtok':>9}{'J/tok':>8}  SLO",
    ]
    pareto = {id(comparison.entries[i]) for i in comparison.pareto}
    for rank, e in enumerate(comparison.best_per_hardware(), 1):
        if e.result is None:
            lines.append(f"{'-':>4}  {e.hardware}: {e.error}")
            continue
        m, econ = e.result.metrics, e.result.economics
        verdict = {True: "meets", False: f"misses ({m.slo_attainment:.0%})", None: "-"}[m.meets_slo]
        front = "*" if id(e) in pareto else " "
        lines.append(
            f"{rank:>4}{front} {config_label(e.result):<32}{m.per_user_tok_s:>11,.1f}"
            f"{m.ttft.p99 * 1e3:>8,.0f}ms{m.tpot.p99 * 1e3:>8,.1f}ms"
            f"{m.output_tok_s * e.result.placement.replicas:>10,.0f}{econ.cost_per_mtok_usd:>9,.3f}"
            f"{econ.joules_per_token:>8,.2f}  {verdict}"
        )
    first = next((e.result for e in comparison.entries if e.result), None)
    if first is not None:
        lines.insert(1, f"workload: {first.workload}")
    best = comparison.cheapest
    if best is None:
        lines.append(f"no configuration tried meets the SLO ({slo})")
    else:
        what = "meeting the SLO" if request.slo else "per output token"
        lines.append(
            f"cheapest {what}: {config_label(best.result)} at ${best.cost:,.3f} per M output tokens"
        )
    lines.append(
        f"{len(comparison.entries)} configurations simulated (all in --json); "
        "* = on the Pareto frontier of cost vs tokens/s per user"
    )
    if plot != "none":
        lines.append(f"Pareto plot (every configuration): {plot}")
    return "\n".join(lines)


def _calibrate(args: argparse.Namespace) -> int:
    from tokenmill.perf.dtypes import Precision
    from tokenmill.perf.trace import read_trace
    from tokenmill.plan.calibrate_fit import fit_trace
    from tokenmill.plan.calibrate_profile import profile_dict, write_calibration
    from tokenmill.plan.models import get_model

    try:
        records = read_trace(args.calibrate_from)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read step trace {args.calibrate_from}: {exc}") from exc
    weights = args.weights_dtype if args.weights_dtype != "bf16" else "fp32"
    precision = Precision(weights=weights, kv=args.kv_dtype)
    fit = fit_trace(records, get_model(args.model).arch, precision)
    path = write_calibration(profile_dict(fit, args.calibrate_from, precision))
    print(
        f"fitted {fit.num_steps} steps: per step {fit.per_step_s * 1e3:.3f} ms, per request "
        f"{fit.per_request_s * 1e3:.3f} ms, {fit.flops_per_s / 1e9:,.1f} GFLOP/s, "
        f"{fit.bytes_per_s / 1e9:,.2f} GB/s; rel. RMS error {fit.rel_rms_error:.1%} "
        f"(median {fit.median_abs_rel_error:.1%})\nwrote {path}"
    )
    return 0


def _list_text() -> str:
    from tokenmill.perf.model import num_params
    from tokenmill.plan.hardware import get_hardware, list_hardware
    from tokenmill.plan.models import get_model, list_models

    lines = ["models:"]
    for name in list_models():
        lines.append(f"  {name:<18}{num_params(get_model(name).arch) / 1e9:>8.2f} B params")
    lines.append("hardware:")
    for name in list_hardware():
        hw = get_hardware(name)
        mem = hw.profile.tier_for("weights")
        lines.append(
            f"  {name:<18}{mem.capacity_bytes / 1e9:>8.2f} GB {mem.name} at "
            f"{mem.bandwidth_bytes_s / 1e12:,.2f} TB/s, {hw.economics.describe()}  "
            f"({hw.display_name})"
        )
    return "\n".join(lines)
