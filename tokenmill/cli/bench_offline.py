"""`tokenmill bench offline`: throughput of a whole workload generated at once (output lengths
forced with ignore_eos), for tokenmill and optionally the transformers peer, on the same GGUF."""

from __future__ import annotations

import argparse
import json

from tokenmill.cli.bench_serve import add_workload_args


def register(kinds) -> None:
    parser = kinds.add_parser("offline", help="LLM.generate throughput on a workload")
    parser.add_argument("model", nargs="?", default=None, help="GGUF (default: bundled model)")
    parser.add_argument(
        "--engines", default="tokenmill", help="comma list of: tokenmill, transformers"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    add_workload_args(parser, num_prompts=256)
    group = parser.add_argument_group("tokenmill")
    group.add_argument("--max-num-seqs", type=int, default=256)
    group.add_argument("--max-num-batched-tokens", type=int, default=2048)
    group.add_argument("--kv-cache-memory", type=float, default=4.0, help="GiB")
    parser.add_argument("--hf-batch-size", type=int, default=64, help="transformers static batch")
    parser.add_argument("--no-ceilings", action="store_true", help="skip the matmul ceiling")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill.bench import offline, report
    from tokenmill.bench.serve import open_model_info
    from tokenmill.cli.bench_serve import build_workload_from_args

    if args.tokenizer is None:
        args.tokenizer = args.model
    info = open_model_info(args.model)
    workload = build_workload_from_args(args)
    prompts = offline.tokenize_workload(workload, info.tokenizer)
    output_lens = [r.output_len for r in workload.requests]
    print(workload.description, flush=True)
    results = []
    for engine in args.engines.split(","):
        if engine == "tokenmill":
            result = offline.run_tokenmill(
                args.model, prompts, output_lens, args.dtype, args.max_num_seqs,
                args.max_num_batched_tokens, args.kv_cache_memory, not args.no_progress,
            )  # fmt: skip
        elif engine == "transformers":
            result = offline.run_transformers(
                info.source, prompts, output_lens, args.dtype, args.hf_batch_size,
                not args.no_progress,
            )  # fmt: skip
        else:
            raise SystemExit(f"unknown engine {engine!r}")
        results.append(result)
    peak = None
    if not args.no_ceilings:
        from tokenmill.bench.ceilings import measure

        peak = measure((args.dtype,)).matmul_flops[args.dtype] / 1e9
        print(f"matmul ceiling ({args.dtype}, measured now): {peak:.0f} GFLOP/s")
    print(offline.format_offline_markdown(results, peak))
    if args.json:
        out = {
            "workload": workload.description,
            "machine": report.machine_info(),
            "matmul_gflops": peak,
            "results": [r.as_dict() for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
