"""`tokenmill plan validate`: predicted vs measured serving on this machine, as a table
(tokenmill.plan.validation.run)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tokenmill.bench.machine_load import describe_load
from tokenmill.cli.plan_calibrate import (
    add_calibration_args,
    add_engine_settings,
    calibration_text,
    comma_separated,
    do_calibrate,
)


def _rates(text: str) -> tuple[float, ...]:
    return comma_separated(text, float, lambda v: v > 0, "rates > 0 like 0.25,0.5,inf")


def register(modes) -> None:
    p = modes.add_parser(
        "validate", help="predicted vs measured serving on this machine, as a table",
        description="Serve the engine here with `tokenmill serve`, load it with `tokenmill bench "
        "serve` at several request rates, simulate the same workloads on the calibrated "
        "this-machine, and write the comparison (markdown and JSON).",
    )  # fmt: skip
    add_engine_settings(p)
    group = p.add_argument_group("workload (as `tokenmill bench serve` takes it)")
    group.add_argument("--workload", default="sharegpt")
    group.add_argument("--num-prompts", type=int, default=48, help="requests per rate")
    group.add_argument("--rates", type=_rates, default=(0.5, 1.0, 2.0, math.inf),
                       help="requests/s, comma-separated; inf: all at once")  # fmt: skip
    group.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1: Poisson")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--num-warmup", type=int, default=1)
    p.add_argument("--speed-probe-prompts", type=int, default=16,
                   help="requests of the speed probe before each run (its measured / predicted "
                   "engine time scales that run's prediction); 0: no probe")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1,
                   help="measured runs per rate, in turn over the rates; the table shows their "
                   "medians and ranges")  # fmt: skip
    p.add_argument("--calibrate", action="store_true", help="calibrate this-machine first")
    add_calibration_args(p)
    p.add_argument("--predict-only", action="store_true", help="no server: predictions alone")
    p.add_argument("--jitter", action="store_true", help="simulate step-time jitter")
    p.add_argument("--out-md", default="docs/planner-validation.md", help="'none': no file")
    p.add_argument("--out-json", default="docs/planner-validation.json", help="'none': no file")
    p.add_argument("--work-dir", default=None, help="server log and bench JSON (default: temp)")
    p.set_defaults(func=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    from tokenmill.plan.validation.predict_measure import ValidationSettings
    from tokenmill.plan.validation.report import format_markdown, write_report
    from tokenmill.plan.validation.run import run_validation

    settings = ValidationSettings(
        model=args.model, dtype=args.dtype, workload=args.workload, num_prompts=args.num_prompts,
        rates=args.rates, burstiness=args.burstiness, seed=args.seed,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, kv_cache_memory_gib=args.kv_cache_memory,
        num_warmup=args.num_warmup, jitter=args.jitter,
        speed_probe_prompts=args.speed_probe_prompts, repeats=args.repeats,
    )  # fmt: skip
    if args.calibrate:
        report, trace, path = do_calibrate(args)
        print(calibration_text(report, trace, path), flush=True)
    print(f"validating; load average {describe_load()}", flush=True)
    result = run_validation(
        settings, do_measure=not args.predict_only,
        work_dir=Path(args.work_dir) if args.work_dir else None,
        log=lambda msg: print(msg, flush=True),
    )  # fmt: skip
    print(format_markdown(result))
    md = None if args.out_md == "none" else Path(args.out_md)
    js = None if args.out_json == "none" else Path(args.out_json)
    write_report(result, md, js)
    for path in (md, js):
        if path is not None:
            print(f"wrote {path}")
    return 0
