"""`tokenmill bench ...`: benchmarks. Each kind is a module exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import json

BENCH_MODULES = (
    "tokenmill.cli.bench_serve",
    "tokenmill.cli.bench_offline",
    "tokenmill.cli.bench_compare",
    "tokenmill.cli.bench_soak",
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmarks (engine, serve, offline, compare, soak)"
    )
    kinds = parser.add_subparsers(dest="bench_kind", required=True)
    engine = kinds.add_parser("engine", help="prefill/decode speed vs this machine's ceilings")
    engine.add_argument("model", nargs="?", default=None)
    engine.add_argument("--dtypes", default="float32,bfloat16")
    engine.add_argument(
        "--quantizations", default="none",
        help="comma list of weight schemes to measure with each dtype (see --quantization)",
    )  # fmt: skip
    engine.add_argument("--batch-sizes", default="1,64")
    engine.add_argument("--output-len", type=int, default=64)
    engine.add_argument("--gain-requests", type=int, default=64)
    engine.add_argument("--json", default=None, help="also write the result to this file")
    engine.set_defaults(func=run_engine)
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(kinds)


def run_engine(args: argparse.Namespace) -> int:
    from tokenmill.bench import engine_bench

    result = engine_bench.run(
        args.model,
        dtypes=tuple(args.dtypes.split(",")),
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
        output_len=args.output_len,
        gain_requests=args.gain_requests,
        quantizations=tuple(args.quantizations.split(",")),
    )
    print(engine_bench.format_markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.as_dict(), f, indent=2)
    return 0
