"""`tokenmill plan routing`: N replicas of a model behind one router, on paper (plan/routing.py).

    tokenmill plan routing --model smollm2-135m --hardware this-machine --replicas 1,2,4,8
    tokenmill plan routing --model llama-3.1-8b --hardware h100 --max-chars 4000 --max-tokens 256

ShareGPT conversations replayed turn by turn, as `python -m tokenmill.bench.replicas` replays
them on real replicas; the load grows with the replicas (conversations and the number in flight
are per replica), so each row asks what one more machine does at the same load per machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from tokenmill.cli.plan_calibrate import comma_separated
from tokenmill.serve_ray.routing_table import POLICIES

GIB = 1 << 30


def register(modes) -> None:
    p = modes.add_parser(
        "routing", help="N replicas behind a prefix-aware or round-robin router, on paper",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )  # fmt: skip
    p.add_argument("--model", default="smollm2-135m", help="catalogue name or config.json path")
    p.add_argument("--hardware", default="this-machine", help="one replica's hardware")
    p.add_argument("--replicas", default=(1, 2, 4, 8), type=_positive_ints,
                   help="replica counts to model, comma-separated")  # fmt: skip
    p.add_argument("--policies", default=POLICIES, type=_policies,
                   help=f"routing policies, comma-separated: {', '.join(POLICIES)}")  # fmt: skip
    p.add_argument("--conversations", type=int, default=16, help="per replica")
    p.add_argument("--concurrency", type=int, default=8, help="conversations in flight per replica")
    p.add_argument("--turns", type=int, default=4, help="exchanges per conversation")
    p.add_argument("--max-chars", type=int, default=600, help="clip each user turn")
    p.add_argument("--max-tokens", type=int, default=32, help="reply length cap")
    p.add_argument("--kv-cache-memory", type=float, default=1.0, help="GiB per replica")
    p.add_argument("--weights-dtype", default="bf16")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-imbalance", type=int, default=4, help="as the Serve router's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.set_defaults(func=run)


def _positive_ints(text: str) -> tuple[int, ...]:
    return comma_separated(text, int, lambda v: v >= 1, "comma-separated positive integers")


def _policies(text: str) -> tuple[str, ...]:
    return comma_separated(text, str.strip, lambda v: v in POLICIES, ", ".join(POLICIES))


def run(args: argparse.Namespace) -> int:
    from tokenmill.plan.routing import simulate_routing
    from tokenmill.plan.routing_setup import replica_setup, sharegpt_chats

    setup, label = replica_setup(
        args.model, args.hardware, args.weights_dtype, args.kv_cache_memory * GIB,
        args.block_size, args.max_num_seqs, args.max_num_batched_tokens, args.max_imbalance,
        args.seed,
    )  # fmt: skip
    chats = sharegpt_chats(
        args.conversations * max(args.replicas), args.turns, args.max_chars, args.max_tokens
    )
    if not args.json:
        print(f"{label}; ShareGPT chats of {args.turns} exchanges (user turns clipped to "
              f"{args.max_chars} characters, replies {args.max_tokens} tokens at most), "
              f"{args.conversations} per replica, {args.concurrency} in flight per replica\n")  # fmt: skip
        print("| replicas | routing | prefix hit rate | TTFT p50 | TTFT p90 | output tok/s "
              "| per replica | requests per replica |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
    for n in args.replicas:
        for policy in args.policies:
            run_ = simulate_routing(
                chats[: args.conversations * n], setup, n, policy, args.concurrency * n
            )
            if args.json:
                print(json.dumps(dataclasses.asdict(run_)))
                continue
            print(
                f"| {n} | {policy} | {run_.hit_rate:.1%} | {run_.ttft_p50_s * 1e3:,.0f} ms "
                f"| {run_.ttft_p90_s * 1e3:,.0f} ms | {run_.output_tok_s:,.1f} "
                f"| {run_.output_tok_s / n:,.1f} | {'/'.join(map(str, run_.requests_per_replica))} |"
            )
    return 0
