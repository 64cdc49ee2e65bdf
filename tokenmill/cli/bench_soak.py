"""`tokenmill bench soak`: a server at saturation for --minutes, clients leaving early, its RSS
sampled; reports the RSS slope after warm-up against --max-slope (see tokenmill.bench.soak).

    tokenmill bench soak --minutes 60 --out soak-results -- --quantization gguf
    tokenmill bench soak --base-url http://127.0.0.1:8000 --pid 1234 --minutes 60
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(kinds) -> None:
    parser = kinds.add_parser("soak", help="hold a server at saturation and watch its memory")
    target = parser.add_argument_group("target (default: start `tokenmill serve SERVER_ARGS`)")
    target.add_argument("--base-url", default=None, help="a running server instead")
    target.add_argument("--pid", type=int, default=None, help="its process id (with --base-url)")
    target.add_argument("--model", default=None, help="model name to send (default: /v1/models)")
    run = parser.add_argument_group("run")
    run.add_argument("--minutes", type=float, default=60.0)
    run.add_argument("--warmup-minutes", type=float, default=5.0, help="left out of the slope")
    run.add_argument("--concurrency", type=int, default=48, help="client loops")
    run.add_argument("--sample-seconds", type=float, default=10.0)
    run.add_argument("--max-slope", type=float, default=0.1, help="MB/min of RSS after warm-up")
    run.add_argument("--grace-seconds", type=float, default=30.0, help="for requests in flight")
    run.add_argument("--drain-seconds", type=float, default=60.0, help="for gauges to reach 0")
    mix = parser.add_argument_group("requests")
    mix.add_argument("--disconnect-fraction", type=float, default=0.3)
    mix.add_argument("--stream-fraction", type=float, default=0.5)
    mix.add_argument("--sampled-fraction", type=float, default=0.5, help="the rest greedy")
    mix.add_argument("--max-tokens", type=int, default=256, help="cap on ShareGPT reply lengths")
    mix.add_argument("--num-prompts", type=int, default=1000, help="ShareGPT prompts cycled")
    mix.add_argument("--tokenizer", default=None, help="measures ShareGPT (default: bundled)")
    mix.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("soak-results"), help="CSV + JSON here")
    parser.add_argument("server_args", nargs=argparse.REMAINDER, help="-- then serve options")
    parser.set_defaults(func=run_soak)


def soak_config(args: argparse.Namespace):
    from tokenmill.bench.soak import SoakConfig
    from tokenmill.bench.soak_clients import ClientMix

    mix = ClientMix(
        args.disconnect_fraction, args.stream_fraction, args.sampled_fraction, args.max_tokens,
        args.seed,
    )  # fmt: skip
    return SoakConfig(
        args.minutes, args.warmup_minutes, args.concurrency, args.sample_seconds,
        args.max_slope, args.grace_seconds, args.drain_seconds, mix,
    )  # fmt: skip


def run_soak(args: argparse.Namespace) -> int:
    from tokenmill.bench.serve_process import ServeProcess
    from tokenmill.bench.soak import format_table, load_prompts, write_outputs
    from tokenmill.errors import ConfigError

    server_args = [a for a in args.server_args if a != "--"]
    if args.base_url and (args.pid is None or server_args):
        raise ConfigError("--base-url needs --pid (for its RSS) and takes no server options")
    cfg = soak_config(args)
    prompts = load_prompts(args.num_prompts, args.tokenizer, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config["out"] = str(args.out)
    if args.base_url:
        summary, samples = _soak(cfg, args.base_url, args.pid, args.model, prompts)
    else:
        with ServeProcess(server_args, args.out / "server.log") as server:
            print(f"tokenmill serve {' '.join(server_args)} -> {server.base_url}", flush=True)
            summary, samples = _soak(cfg, server.base_url, server.proc.pid, args.model, prompts)
    write_outputs(args.out, summary, samples, config)
    print(format_table(summary))
    return 0 if summary.is_pass else 1


def _soak(cfg, base_url: str, pid: int, model: str | None, prompts):
    import asyncio

    from tokenmill.bench.serve import first_model
    from tokenmill.bench.soak import soak_async

    model = model or first_model(base_url)
    print(
        f"soak: {cfg.minutes:g} min, {cfg.concurrency} clients, {len(prompts)} ShareGPT prompts "
        f"-> {base_url} ({model}, pid {pid})",
        flush=True,
    )
    return asyncio.run(soak_async(cfg, base_url, pid, model, prompts))
