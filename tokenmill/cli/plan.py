"""`tokenmill plan`: what a model and its traffic cost on some hardware, and how fast they run.

    tokenmill plan --model llama-3.1-8b --hardware h100 --workload fixed:in=1000,out=1000 \\
                   --concurrency 32 [--slo ttft=500ms,tpot=50ms] [--json]
    tokenmill plan --model llama-3.1-70b --compare h100,h200,groq-lpu,cerebras-wse3 --rate 4
    tokenmill plan --model llama-3.1-70b --hardware h100 --size --rate 20 \\
                   --slo ttft=2s,tpot=50ms                  # fewest chips meeting it, ranked by $
    tokenmill plan --model llama-3.1-8b --hardware h100 --rate 40 --slo ttft=2s,tpot=100ms \\
                   --slo-policy reject       # the engine's admission: refused share, goodput
    tokenmill plan --model llama-3.1-70b --sweep concurrency=1,4,16,64,256 \\
                   --compare h100x8,groq-lpu,cerebras-wse3  # the crossover chart
    tokenmill plan --list [--verbose]                   # --verbose: every guessed/fitted figure
    tokenmill plan --model smollm2-135m --calibrate-from trace.jsonl
    tokenmill plan calibrate [--dtype float32]          # run the engine here, fit this-machine
    tokenmill plan validate [--calibrate] [--rates 0.5,1,2,inf] [--num-prompts 48]
    tokenmill plan routing --replicas 1,2,4,8   # N replicas: prefix-aware vs round-robin routing
"""

from __future__ import annotations

import argparse
import json
import math

from tokenmill.cli import plan_calibrate, plan_routing, plan_validate
from tokenmill.cli.plan_compare import DEFAULT_PLOT
from tokenmill.config import SLO_POLICIES
from tokenmill.errors import ConfigError

SEARCH_OPEN_SAMPLE = 128  # measured requests per simulation when a search runs many


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
    p.add_argument("--verbose", action="store_true", help="--list: every guessed/fitted figure")
    p.add_argument("--size", action="store_true", help="fewest chips meeting --slo at the load")
    p.add_argument("--sweep", help="the crossover chart: concurrency=1,4,16 or rate=1,10,100")
    p.add_argument(
        "--workload",
        default="fixed:in=1000,out=1000",
        help="fixed:in=N,out=N | random:in=N,out=N,range=R | sharegpt[:out=N]",
    )
    p.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    p.add_argument("--rate", type=float, help="open loop: requests per second")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson)")
    p.add_argument(
        "--num-prompts", type=int, help="per replica: requests (closed loop) or measured (rate)"
    )
    p.add_argument(
        "--weights-dtype", default="bf16",
        help="fp32 | bf16 | fp16 | fp8 | int8 | int4 (int8/int4 answers quote the quality "
        "tokenmill quant-eval measured on the CPU runtime)",
    )  # fmt: skip
    p.add_argument(
        "--kv-dtype", default=None, help="bf16 | fp16 | fp8 | int8 (default: activations)"
    )
    p.add_argument("--chips", type=int, help="chips per replica (default: the fewest that fit)")
    p.add_argument("--tp", type=int, help="tensor-parallel width")
    p.add_argument("--replicas", type=int, default=1, help="identical replicas sharing the load")
    _add_engine_args(p)
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
    modes = p.add_subparsers(dest="plan_mode", metavar="{calibrate,validate,routing}")
    plan_calibrate.register(modes)
    plan_validate.register(modes)
    plan_routing.register(modes)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """What the simulated engine is told: targets, latency promises, scheduler knobs."""
    p.add_argument(
        "--slo", help="e.g. ttft=500ms,tpot=50ms[,itl=..,e2e=..,tok_s_per_user=..][,pct=99]"
    )
    p.add_argument(
        "--slo-policy", default="off", choices=SLO_POLICIES,
        help="simulate the engine's latency promises for --slo, as `tokenmill serve "
        "--slo-policy`: reject | queue | best-effort; off (default): no admission control",
    )  # fmt: skip
    p.add_argument("--spec-decode", help=SPEC_DECODE_HELP)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-seqs", type=int, help="sequences the placement must hold KV for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-jitter", action="store_true", help="no step-time jitter on GPUs/CPUs")


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(_list_text(args.verbose))
        return 0
    if not args.model:
        raise ConfigError("--model is required (see tokenmill plan --list)")
    if args.calibrate_from:
        return _calibrate(args)
    request = _plan_request(args)
    loader, notes = _tokenizer_loader(request), _tokenizer_notes(request)
    if args.sweep:
        from tokenmill.cli.plan_sweep import run_sweep

        return run_sweep(args, request, loader, notes)
    if args.size and request.slo is None:
        raise ConfigError("--size needs --slo: the targets the deployment must meet")
    if args.compare:
        from tokenmill.cli.plan_compare import run_compare

        return run_compare(args, request, loader, notes)
    if not args.hardware:
        raise ConfigError("give --hardware NAME or --compare NAME,NAME,... (see --list)")
    if args.size:
        from tokenmill.cli.plan_compare import run_size

        return run_size(args, request, loader, notes)
    from tokenmill.plan.planner import build_sample, run_plan
    from tokenmill.plan.report import to_json, to_text
    from tokenmill.plan.search import best_on_chips

    if request.chips and not request.tp:
        result, _ = best_on_chips(request, build_sample(request, loader))
    else:
        result = run_plan(request, loader)
    from tokenmill.plan.quality import quality_notes

    notes = _tokenizer_notes(request) + quality_notes(request.precision)
    if args.json:
        out = to_json(result)
        out["notes"] += notes
        print(json.dumps(out, indent=2))
    else:
        print(to_text(result))
        for note in notes:
            print(f"{'note':<11}{note}")
    return 0


def _plan_request(args: argparse.Namespace):
    from tokenmill.perf.dtypes import Precision
    from tokenmill.plan.planner import PlanRequest

    if args.burstiness <= 0 or not math.isfinite(args.burstiness):
        raise ConfigError(f"--burstiness must be a positive number, got {args.burstiness}")
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    concurrency, rate = args.concurrency, args.rate
    if args.sweep and concurrency is None and rate is None:
        from tokenmill.plan.sweep import parse_sweep

        key, values = parse_sweep(args.sweep)  # the first value stands in until the sweep
        concurrency, rate = (int(values[0]), None) if key == "concurrency" else (None, values[0])
    num_prompts = args.num_prompts
    searching = args.compare or args.size or args.sweep
    if num_prompts is None and searching:  # many simulations: keep each short
        num_prompts = SEARCH_OPEN_SAMPLE if rate else max(2 * (concurrency or 1), 32)
    return PlanRequest(
        model=args.model,
        hardware=args.hardware or "h100",
        workload=args.workload,
        concurrency=concurrency,
        rate=rate,
        burstiness=args.burstiness,
        num_prompts=num_prompts,
        precision=Precision(weights=args.weights_dtype, kv=args.kv_dtype),
        chips=args.chips,
        tp=args.tp,
        replicas=args.replicas,
        slo=_parse_slo(args.slo) if args.slo else None,
        slo_policy=args.slo_policy,
        spec=_parse_spec_decode(args.spec_decode) if args.spec_decode else None,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_seqs=args.kv_seqs,
        seed=args.seed,
        jitter=not args.no_jitter,
    )


def _parse_slo(text: str):
    """workload/slo.py's syntax plus `tok_s_per_user=N`: every request's TPOT within 1/N."""
    import dataclasses

    from tokenmill.workload.slo import SLO, parse_slo

    items, speed = [], None
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, raw = item.partition("=")
        if key.strip().lower() != "tok_s_per_user":
            items.append(item)
            continue
        try:
            speed = float(raw)
        except ValueError:
            raise ConfigError(f"bad SLO item {item!r}: tok_s_per_user takes a number") from None
        if not speed > 0:
            raise ConfigError(f"bad SLO item {item!r}: tok_s_per_user must be positive")
    slo = parse_slo(",".join(items)) if items else SLO()
    if speed is not None:
        tpot = 1 / speed if slo.tpot_s is None else min(slo.tpot_s, 1 / speed)
        slo = dataclasses.replace(slo, tpot_s=tpot)
    if not slo.targets_ms():
        raise ConfigError(f"SLO {text!r} sets no target")
    return slo


SPEC_DECODE_HELP = (
    "speculative decoding: k=4,accept=0.7[,cost=0.05]; accept per draft position (0.9/0.8/0.7), "
    "or measured:URL (a tokenmill server's /metrics, or a saved copy)"
)


def _parse_spec_decode(text: str):
    """k=4,accept=0.7[,cost=0.05]; accept may be per position (0.9/0.8/0.7) or
    measured:<a tokenmill server's /metrics URL or a saved copy>."""
    from tokenmill.plan.sim_runner import SpecDecodeConfig
    from tokenmill.plan.spec_acceptance import measured_acceptance

    usage = "use k=4,accept=0.7[,cost=0.05] (accept=0.9/0.8/0.7 or accept=measured:URL)"
    values, per_position = {}, ()
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or key not in ("k", "accept", "cost"):
            raise ConfigError(f"bad --spec-decode item {item!r}; {usage}")
        try:
            if key == "accept" and raw.startswith("measured:"):
                per_position = measured_acceptance(raw.removeprefix("measured:"))
                raw = str(per_position[-1])
            elif key == "accept" and "/" in raw:
                per_position = tuple(float(r) for r in raw.split("/"))
                raw = raw.split("/")[-1]
            values[key] = float(raw)
        except ValueError:
            raise ConfigError(f"bad --spec-decode value {item!r}; {usage}") from None
    if "k" not in values or "accept" not in values or values["k"] != int(values["k"]):
        raise ConfigError("--spec-decode needs an integer k= and accept=, e.g. k=4,accept=0.7")
    return SpecDecodeConfig(
        int(values["k"]), values["accept"], values.get("cost", 0.0), per_position
    )


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


def _calibrate(args: argparse.Namespace) -> int:
    from tokenmill.perf.dtypes import Precision
    from tokenmill.perf.trace import read_trace
    from tokenmill.plan.calibration.fit import fit_trace
    from tokenmill.plan.calibration.profile import profile_dict, write_calibration
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


def _list_text(verbose: bool = False) -> str:
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
    if verbose:
        from tokenmill.plan.assumptions import all_assumptions, format_assumptions

        lines.append(format_assumptions(all_assumptions()))
    return "\n".join(lines)
