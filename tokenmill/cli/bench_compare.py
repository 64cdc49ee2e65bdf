"""`tokenmill bench compare`: tokenmill, llama.cpp's llama-server and transformers on the same
GGUF and dtype, interleaved, median of repetitions; writes results.md and plots to a folder."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import time


def _csv(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x)


def register(kinds) -> None:
    p = kinds.add_parser("compare", help="tokenmill vs llama-server vs transformers, one run")
    p.add_argument("model", nargs="?", default=None, help="GGUF (default: the bundled model)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--weights", default="bf16-gguf", choices=["bf16-gguf", "as-is"],
        help="bf16-gguf: every engine loads a BF16 GGUF made from MODEL (same weights as "
        "MODEL dequantized to bfloat16); as-is: MODEL itself",
    )  # fmt: skip
    p.add_argument(
        "--quantization", default="none",
        help="tokenmill's weights (see `serve --quantization`); with --weights as-is and gguf, "
        "tokenmill computes on the file's own blocks as llama.cpp does",
    )  # fmt: skip
    p.add_argument("--results", default=None, help="folder (default: bench-results/<time>)")
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--scenarios", type=_csv(str), default=("offline", "serve", "tpot", "engine"),
                   help="comma list of: offline, serve, tpot, engine, sweep")  # fmt: skip
    p.add_argument("--engines", type=_csv(str), default=("tokenmill", "llama.cpp", "transformers"))
    p.add_argument("--offline-prompts", type=int, default=256)
    p.add_argument("--serve-prompts", type=int, default=128)
    p.add_argument("--offline-workload", default="sharegpt")
    p.add_argument("--serve-workload", default="sharegpt")
    p.add_argument("--tpot-workload", default="fixed:in=128,out=128")
    p.add_argument("--tpot-requests", type=int, default=6)
    p.add_argument("--kv-cache-memory", type=float, default=4.0, help="GiB, both servers")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--transformers-repetitions", type=int, default=3)
    p.add_argument("--offline-repetitions", type=int, default=3)
    p.add_argument("--max-llama-slots", type=int, default=128, help="llama-server --parallel cap")
    p.add_argument("--engine-batch-sizes", type=_csv(int), default=(1, 64, 128))
    p.add_argument("--sweep-rates", type=_csv(float), default=(1.0, 2.0, 4.0))
    p.add_argument("--sweep-concurrency", type=_csv(int), default=(1, 4, 16, 64))
    p.add_argument("--sweep-workload", default="sharegpt:out=128")
    p.add_argument("--sweep-requests", type=int, default=32)
    p.add_argument("--llama-cpp-version", default=None, help="llama-cpp-python sdist version")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokenmill.bench import llamacpp, report
    from tokenmill.bench.compare import CompareConfig, Comparison, write_report
    from tokenmill.loader.default_model import default_model_path

    logging.getLogger("tokenmill.bench").setLevel(logging.INFO)
    # SIGTERM unwinds like Ctrl-C, so the servers a run started are stopped with it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    source = args.model or default_model_path()
    needs_build = "llama.cpp" in args.engines or args.weights == "bf16-gguf"
    build = llamacpp.ensure_built(args.llama_cpp_version) if needs_build else None
    model = llamacpp.to_bf16_gguf(build, source) if args.weights == "bf16-gguf" else source
    results = Path(args.results or time.strftime("bench-results/%Y%m%d-%H%M%S"))
    cfg = CompareConfig(
        model=str(model), tokenizer_model=source, results_dir=results, dtype=args.dtype,
        quantization=args.quantization,
        repetitions=args.repetitions, scenarios=args.scenarios, engines=args.engines,
        offline_prompts=args.offline_prompts, serve_prompts=args.serve_prompts,
        offline_workload=args.offline_workload, serve_workload=args.serve_workload,
        tpot_workload=args.tpot_workload, tpot_requests=args.tpot_requests,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_gib=args.kv_cache_memory, hf_batch_size=args.hf_batch_size,
        transformers_repetitions=args.transformers_repetitions,
        offline_repetitions=args.offline_repetitions, max_llama_slots=args.max_llama_slots,
        engine_batch_sizes=args.engine_batch_sizes, sweep_rates=args.sweep_rates,
        sweep_concurrency=args.sweep_concurrency, sweep_workload=args.sweep_workload,
        sweep_requests=args.sweep_requests, seed=args.seed,
    )  # fmt: skip
    comp = Comparison(cfg, build)
    machine = report.machine_info()
    comp.run()
    header = "\n".join([
        "### tokenmill bench compare",
        "",
        f"- command: `tokenmill {shlex.join(sys.argv[1:])}`",
        f"- machine: {machine['cpu']}, {machine['cpu_count']} CPUs; torch {machine['torch']} "
        f"({machine['torch_threads']} threads); python {machine['python']}; {machine['time']}",
        f"- llama.cpp: from llama-cpp-python {build.version if build else 'n/a'} (llama-server, "
        "llama-bench; GGML_NATIVE)",
        f"- weights: {model} ({args.dtype}); source {source}",
        f"- {cfg.repetitions} repetitions, engines interleaved (order rotating); medians shown",
        "",
    ])  # fmt: skip
    path = write_report(comp, header)
    print(path.read_text())
    return 0
