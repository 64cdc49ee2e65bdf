"""`tokenmill` entry point: one sub-command per module, each exposing `register(subparsers)`.

A sub-command module adds its parser and sets `func` (called with the parsed args, returning an
exit code). Modules are imported only to register, and heavy imports stay inside `func`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tokenmill.errors import TokenmillError

SUBCOMMAND_MODULES = (
    "tokenmill.cli.generate",
    "tokenmill.cli.chat",
    "tokenmill.cli.serve",
    "tokenmill.cli.bench",
    "tokenmill.cli.plan",
    "tokenmill.cli.quant_eval",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except TokenmillError as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
