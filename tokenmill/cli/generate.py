"""`tokenmill generate`: offline generation for one or many prompts."""

from __future__ import annotations

import argparse
import json
import sys

from tokenmill.cli.engine_args import (
    add_engine_args,
    add_sampling_args,
    engine_config_from_args,
    sampling_params_from_args,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text for prompts (offline, batched)")
    parser.add_argument(
        "prompts", nargs="*", help="prompt texts; '-' reads one per line from stdin"
    )
    parser.add_argument("--model", default=None, help="GGUF file or Hugging Face folder")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_engine_args(parser, positional_model=False)
    add_sampling_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill.engine.build import build_engine
    from tokenmill.errors import InvalidRequestError
    from tokenmill.llm import LLM

    prompts = [line.rstrip("\n") for line in sys.stdin] if args.prompts == ["-"] else args.prompts
    if not prompts:
        raise InvalidRequestError('no prompt given: tokenmill generate "your prompt"')
    params = sampling_params_from_args(args, n=args.n)
    llm = LLM.from_engine(build_engine(engine_config_from_args(args)))
    if args.chat:
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        outputs = llm.chat(conversations, params)
    else:
        outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        if args.json:
            print(json.dumps({
                "prompt": prompt,
                "outputs": [
                    {"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason}
                    for o in out.outputs
                ],
            }))  # fmt: skip
            continue
        for o in out.outputs:
            print(
                o.text if len(prompts) == 1 and args.n == 1 else f"[{prompt!r} #{o.index}] {o.text}"
            )
    return 0
