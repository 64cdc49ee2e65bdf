"""`python -m tokenmill.native build [--variant native|portable|all]`: compile the native CPU
kernels ahead of time (make install does), with progress and the time it took. `all` builds the
variants side by side, one process each: a single build leaves a core idle while its last files
compile, so two at once finish in about the time of their summed CPU work over the cores."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from tokenmill.native import build, selected_variant


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.native")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("build", help="compile the native kernels unless they are built")
    cmd.add_argument(
        "--variant", choices=(*build.VARIANTS, "all", "selected"), default="selected",
        help="which variant (default: the one TOKENMILL_NATIVE selects)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.variant == "selected":
        names = [selected_variant()] if selected_variant() else []
    else:
        names = list(build.VARIANTS) if args.variant == "all" else [args.variant]
    if not names:
        print("TOKENMILL_NATIVE=0: native kernels are off, nothing to build")
    if len(names) > 1:
        return _build_side_by_side(names)
    for name in names:
        try:
            _build_one(build.variant(name))
        except Exception as exc:  # noqa: BLE001 - no compiler is allowed: PyTorch ops then
            print(f"native kernels ({name}) could not be built; PyTorch ops will run: {exc}")
    return 0


def _build_one(v: build.Variant) -> None:
    path = build.library_path(v)
    if path is not None:
        print(f"native kernels ({v.name}) already built: {path}")
        return
    print(
        f"compiling native kernels ({v.name}: {' '.join(v.cflags)}), {len(build.SOURCES)} files, "
        f"one-time, about {build.estimated_minutes()} min",
        flush=True,
    )
    start = time.monotonic()
    path = build.build(v, report=lambda line: print(f"{v.name}: {line.strip()}", flush=True))
    module = build.load(v)
    print(
        f"native kernels ({v.name}, {module.isa()}) built in {time.monotonic() - start:.0f} s: "
        f"{path}",
        flush=True,
    )


def _build_side_by_side(names: list[str]) -> int:
    """One `build --variant NAME` process per variant, run at once; their lines interleave, each
    progress line naming its variant."""
    argv = [sys.executable, "-m", "tokenmill.native", "build", "--variant"]
    processes = [subprocess.Popen([*argv, name]) for name in names]
    return max(process.wait() for process in processes)


if __name__ == "__main__":
    sys.exit(main())
