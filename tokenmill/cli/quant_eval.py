"""`tokenmill quant-eval`: quality, speed and memory of precision schemes vs float32, per task."""

from __future__ import annotations

import argparse

from tokenmill.cli.plan_calibrate import comma_separated

DEFAULT_SCHEMES = (
    "none,bf16,gguf,int8,int4-g32,int4-g64,int4-g128,int4-g128-sym,kv-int8,kv-fp8,"
    "int8+kv-int8,int4-g64+kv-int8"
)


def _ints(text: str) -> tuple[int, ...]:
    return comma_separated(text, int, lambda v: v >= 1, "comma-separated positive integers")


def _names(text: str) -> tuple[str, ...]:
    return comma_separated(text, str.strip, bool, "comma-separated names")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quant-eval", help="what each precision scheme costs in quality, per task",
        description="Teacher-force each task's texts through the engine under each scheme and "
        "under the reference (the model computed in float32): perplexity, KL(reference || "
        "scheme) and top-1 agreement per token; task accuracy from greedy answers (HumanEval "
        "run in a sandbox, exact arithmetic); prefill and decode speed; weight and KV memory.",
    )  # fmt: skip
    p.add_argument(
        "--models",
        type=_names,
        default=("smollm2", "gemma3"),
        help="smollm2, gemma3 (the bundled models) or paths, comma-separated",
    )
    p.add_argument(
        "--schemes",
        default=DEFAULT_SCHEMES,
        help="none, bf16, fp32, gguf, int8, int4-g32/64/128[-sym], any of those integer ones "
        "with -a16, kv-int8, kv-fp8 and combinations like int8+kv-int8",
    )
    p.add_argument("--tasks", default="chat,code,math", help="chat, code, math")
    p.add_argument("--num-samples", type=int, default=50, help="texts and questions per task")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="scored tokens per text, generated tokens per answer",
    )
    p.add_argument(
        "--chunk-tokens",
        type=int,
        default=64,
        help="prefill chunk when teacher-forcing (later chunks read the KV cache)",
    )
    p.add_argument("--batch-sizes", type=_ints, default=(1, 64), help="decode batches timed")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    p.add_argument("--max-kl", type=float, default=0.01, help="tolerance: mean KL, nats/token")
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.02,
        help="tolerance: accuracy below the reference's",
    )
    p.add_argument(
        "--reference-cache-gib",
        type=float,
        default=2.0,
        help="reference logits kept in memory (the rest are recomputed)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated math problems")
    p.add_argument("--output-dir", default="quant-eval-results")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    from tokenmill.errors import ConfigError
    from tokenmill.quant_eval.harness import EvalSettings
    from tokenmill.quant_eval.results import Tolerance
    from tokenmill.quant_eval.run import run_quant_eval
    from tokenmill.quant_eval.schemes import parse_schemes
    from tokenmill.quant_eval.speed import SpeedSettings
    from tokenmill.quant_eval.tasks import TaskSize, parse_tasks

    if args.num_samples < 1 or args.max_tokens < 1 or args.chunk_tokens < 1:
        raise ConfigError("--num-samples, --max-tokens and --chunk-tokens must be >= 1")
    settings = EvalSettings(
        tasks=parse_tasks(args.tasks),
        size=TaskSize(args.num_samples, args.max_tokens, args.seed),
        chunk_tokens=args.chunk_tokens,
        speed=None if args.no_speed else SpeedSettings(batch_sizes=args.batch_sizes),
        device=args.device,
        reference_cache_gib=args.reference_cache_gib,
        progress=not args.no_progress,
    )
    tolerance = Tolerance(args.max_kl, args.max_accuracy_drop)
    out = run_quant_eval(
        args.models, parse_schemes(args.schemes), settings, tolerance, args.output_dir
    )
    print(out.markdown)
    print(f"wrote {out.json_path}, {out.markdown_path}, " + ", ".join(map(str, out.plot_paths)))
    for line in out.summary_lines:
        print(line)
    return 0
