"""tokenmill's native CPU kernels: the C++ sources (csrc/), their build (build.py, run by
`python -m tokenmill.native build` from `make install`) and the dispatch (here).

    kernels()   the loaded extension module of the variant TOKENMILL_NATIVE selects, or None
                (TOKENMILL_NATIVE=0, no compiler, a failed build): callers then keep their
                pure-PyTorch path, so nothing depends on a compiler being present.
    variant     "native" (-march=native) or "portable" (AVX2 on x86, -O3 elsewhere). The module
                tells which fast paths it holds: has_avx512f(), has_avx512_bf16(), isa(); the
                others run portable loops there.

A variant that is not built yet is compiled on first use, with a warning that says so; the
server checks `needs_build()` before it listens, so it can report that it is starting.
"""

from __future__ import annotations

import functools
import logging
import threading
from types import ModuleType

from tokenmill.env import native_mode
from tokenmill.native import build

logger = logging.getLogger(__name__)

_lock = threading.Lock()


def selected_variant() -> str | None:
    """The variant TOKENMILL_NATIVE selects; None when the native kernels are off."""
    mode = native_mode()
    return None if mode == "off" else mode


def needs_build() -> bool:
    """Whether the first kernels() call will compile (the selected variant is not built)."""
    name = selected_variant()
    return name is not None and build.library_path(build.variant(name)) is None


def build_notice() -> str:
    minutes = build.estimated_minutes()
    return (
        f"compiling native kernels, one-time, about {minutes} minute{'s' if minutes > 1 else ''} "
        "(`make install` or `python -m tokenmill.native build` does it ahead of time)"
    )


def kernels() -> ModuleType | None:
    """The native kernels module of the selected variant, or None (off, or unavailable)."""
    with _lock:
        return _load(selected_variant())


@functools.cache
def _load(name: str | None) -> ModuleType | None:
    if name is None:
        return None
    v = build.variant(name)
    if build.library_path(v) is None:
        logger.warning("%s", build_notice())
    try:
        return build.load(v)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        logger.warning("native CPU kernels (%s) unavailable (%s); using PyTorch ops", name, exc)
        return None


def load_variant(name: str) -> ModuleType:
    """The module of one variant, whatever TOKENMILL_NATIVE says (tests, benchmarks)."""
    return build.load(build.variant(name))
