"""`tokenmill plan calibrate`: run the engine here through serving's batch shapes and fit
this machine's profile (tokenmill.plan.calibration.run); its engine and shape arguments, which
`tokenmill plan validate --calibrate` takes too."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenmill.bench.machine_load import describe_load
from tokenmill.config import DTYPES
from tokenmill.errors import ConfigError


def add_engine_settings(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("engine (as `tokenmill serve` takes them)")
    group.add_argument(
        "--model", default=None, help="GGUF file or HF folder (default: the bundled SmolLM2-135M)"
    )
    group.add_argument("--dtype", default="float32", choices=DTYPES)
    group.add_argument("--max-num-seqs", type=int, default=64)
    group.add_argument("--max-num-batched-tokens", type=int, default=512)
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--kv-cache-memory", type=float, default=1.0, help="GiB for the KV cache")


def comma_separated(text: str, convert, is_valid, expected: str) -> tuple:
    """`1,2,4` -> (1, 2, 4) for argparse; an ArgumentTypeError names what was expected."""
    try:
        values = tuple(convert(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or not all(is_valid(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return values


def _ints(text: str) -> tuple[int, ...]:
    return comma_separated(text, int, lambda v: v >= 1, "comma-separated positive integers")


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("calibration shapes")
    group.add_argument("--prefill-lens", type=_ints, default=(16, 64, 128, 256, 384, 512, 1024))
    group.add_argument("--batch-sizes", type=_ints, default=(1, 2, 4, 8, 16, 32, 64),
                       help="decode batches at a 32-token context")  # fmt: skip
    group.add_argument("--long-prompt-len", type=int, default=400)
    group.add_argument("--long-batch-sizes", type=_ints, default=(1, 4, 16, 32, 48),
                       help="decode batches at --long-prompt-len context")  # fmt: skip
    group.add_argument("--decode-steps", type=int, default=10)
    group.add_argument(
        "--combine", default="auto", choices=["auto", "sum", "max"],
        help="per operator: compute + memory time, or their max; auto: the lower held-out error",
    )  # fmt: skip
    group.add_argument("--calibration-seed", type=int, default=0)
    group.add_argument(
        "--served", action="store_true",
        help="send the scenarios to a `tokenmill serve` as streamed requests and fit the steps "
        "it records (default: an engine in this process)",
    )  # fmt: skip


def register(modes) -> None:
    p = modes.add_parser(
        "calibrate", help="run the engine through serving's batch shapes and fit this-machine",
        description="Run the real engine on this machine (in this process; --served: a "
        "`tokenmill serve` fed streamed requests) through prefill chunks, decode batches "
        "and mixed steps, fit this-machine's profile to the step times (some scenarios held out "
        "to measure the prediction error) and write it to $TOKENMILL_HOME/this-machine.json.",
    )  # fmt: skip
    add_engine_settings(p)
    add_calibration_args(p)
    p.add_argument("--out", default=None, help="profile path (default: this-machine.json)")
    p.add_argument("--json", action="store_true", help="print the calibration summary as JSON")
    p.set_defaults(func=_run_calibrate)


def _calibration_settings(args: argparse.Namespace):
    from tokenmill.plan.calibration.scenarios import CalibrationSettings

    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "decode_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    return CalibrationSettings(
        model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        kv_cache_memory_gib=args.kv_cache_memory, prefill_lens=args.prefill_lens,
        batch_sizes=args.batch_sizes, long_prompt_len=args.long_prompt_len,
        long_batch_sizes=args.long_batch_sizes, decode_steps=args.decode_steps,
        seed=args.calibration_seed, served=args.served,
    )  # fmt: skip


def do_calibrate(args: argparse.Namespace, out: str | None = None):
    from tokenmill.plan.calibration.run import calibrate

    settings = _calibration_settings(args)
    how = "through tokenmill serve" if args.served else "in this process"
    print(
        f"calibrating this machine ({settings.dtype}, {how}); load average {describe_load()}",
        flush=True,
    )
    report, trace, path = calibrate(
        settings, args.combine, Path(out) if out else None,
        progress=lambda msg: print(f"  {msg}", flush=True),
    )  # fmt: skip
    return report, trace, path


def _run_calibrate(args: argparse.Namespace) -> int:
    report, trace, path = do_calibrate(args, args.out)
    if args.json:
        print(json.dumps(report.summary(), indent=2))
    else:
        print(calibration_text(report, trace, path))
    return 0


def calibration_text(report, trace, path) -> str:
    fit = report.fit
    attn = fit.attention_flops_per_s
    lines = [
        f"fitted {fit.num_steps} steps ({fit.num_outliers} dropped as disturbed) in "
        f"{trace.elapsed_s:.0f} s, load average {trace.loadavg_before[:1]} -> "
        f"{trace.loadavg_after[:1]}",
        f"  model: per operator {'max' if fit.overlap else 'sum'}(compute, memory); held-out RMS "
        + ", ".join(f"{k} {v:.1%}" for k, v in report.candidates.items()),
        f"  per step {fit.per_step_s * 1e3:.3f} ms, per request {fit.per_request_s * 1e3:.3f} ms,"
        f" per prompt segment {fit.per_prefill_s * 1e3:.3f} ms,"
        f" {fit.flops_per_s / 1e9:,.1f} GFLOP/s (attention "
        + (f"{attn / 1e9:,.1f} GFLOP/s" if attn < 1e17 else "free")
        + f"), {fit.bytes_per_s / 1e9:,.2f} GB/s",
        f"  fit on all steps: rel. RMS {fit.rel_rms_error:.1%}, median "
        f"{fit.median_abs_rel_error:.1%}",
    ]
    for kind, err in report.holdout_errors.items():
        if err.num_steps:
            lines.append(f"  held out, {kind}: {err.describe()}")
    lines.append(f"wrote {path}")
    return "\n".join(lines)
