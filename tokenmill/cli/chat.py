"""`tokenmill chat`: an interactive conversation that streams tokens as they are generated."""

from __future__ import annotations

import argparse
import sys

from tokenmill.cli.engine_args import (
    add_engine_args,
    add_sampling_args,
    engine_config_from_args,
    sampling_params_from_args,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal")
    parser.add_argument("--system", default=None, help="a system message")
    add_engine_args(parser)
    add_sampling_args(parser, max_tokens=512)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill.engine.build import build_engine
    from tokenmill.outputs import OutputKind
    from tokenmill.tokenizer.chat_template import with_end_of_turn

    engine = build_engine(engine_config_from_args(args))
    params = with_end_of_turn(sampling_params_from_args(args), engine.tokenizer)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    print("tokenmill chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.")
    turn = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        prompt = engine.tokenizer.apply_chat_template(messages, tokenize=True)
        request_id = f"chat-{turn}"
        turn += 1
        engine.add_request(request_id, prompt, params, output_kind=OutputKind.DELTA)
        print("assistant> ", end="", flush=True)
        reply = _stream(engine, request_id)
        messages.append({"role": "assistant", "content": reply})
    return 0


def _stream(engine, request_id: str) -> str:
    pieces = []
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                for o in out.outputs:  # deltas
                    print(o.text, end="", flush=True)
                    pieces.append(o.text)
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        print(" [interrupted]", end="")
    print()
    return "".join(pieces)
