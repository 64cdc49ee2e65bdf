"""Compiling the native kernels: one build per (variant, sources, torch version, CPU), cached.

    TOKENMILL_HOME/torch_extensions/tokenmill_native_<variant>_<hash>/
        tokenmill_native_<variant>.so     the module; its presence means "built"
        tokenmill.lock                    held (with our pid) while a build runs

The translation units compile in parallel under ninja (torch.utils.cpp_extension). torch's own
lock file in the build folder (`lock`) waits forever once its holder is killed; every build
here takes tokenmill.lock first, so a torch lock found while holding it is stale and removed.
A home that is not writable falls back, with a warning, to a folder under the temp dir.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tokenmill.env import home_dir
from tokenmill.native.lock import PidLock
from tokenmill.platform_info import cpu_flags, cpu_model_name

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (
    "bindings.cpp",
    "paged_attention_cpu.cpp",
    "paged_attention_f32.cpp",
    "paged_attention_bf16.cpp",
    "paged_attention_int8.cpp",
    "paged_attention_fp8.cpp",
    "gemm_bf16_cpu.cpp",
    "gemm_f32_cpu.cpp",
    "llama_decode_cpu.cpp",
    "argmax_cpu.cpp",
    "quant_gemm_cpu.cpp",
)
VARIANTS = ("native", "portable")
# CPU seconds one build takes (measured: 2 cores, g++ 12), for the "about N minutes" notice.
_BUILD_CPU_S = 45.0
_LOCK_TIMEOUT_S = 1800.0
_TORCH_BATON = "lock"


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@dataclass(frozen=True)
class Variant:
    """A set of compiler flags the kernels are built with."""

    name: str
    cflags: tuple[str, ...]

    @property
    def module_name(self) -> str:
        return f"tokenmill_native_{self.name}"


def variant(name: str) -> Variant:
    """native: this CPU's every instruction (AVX-512 where it has it); portable: x86-64-v3
    (AVX2 + FMA, no AVX-512) on x86, the compiler's default target elsewhere."""
    if name == "native":
        arch = ("-march=native",) if _is_x86() else ("-mcpu=native",)
    elif name == "portable":
        arch = ("-march=x86-64-v3",) if _is_x86() else ()
    else:
        raise ValueError(f"unknown native-kernel variant {name!r}; known: {VARIANTS}")
    return Variant(name, ("-O3", *arch, "-fopenmp"))


def _cpu_signature(v: Variant) -> str:
    """A native build must only be reused on the same CPU kind."""
    if v.name != "native":
        return platform.machine()
    return " ".join((platform.machine(), cpu_model_name(), *sorted(cpu_flags())))


def _digest(v: Variant) -> str:
    import torch

    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    digest.update(f"{torch.__version__}|{_cpu_signature(v)}|{' '.join(v.cflags)}".encode())
    return digest.hexdigest()[:16]


def _is_writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _roots() -> tuple[Path, Path]:
    """Where builds live: under TOKENMILL_HOME, and the fallback when that is not writable."""
    fallback = Path(tempfile.gettempdir()) / f"tokenmill-{os.getuid()}" / "torch_extensions"
    return home_dir() / "torch_extensions", fallback


def build_dirs(v: Variant) -> list[Path]:
    """The folders a build of `v` may be in, preferred first."""
    name = f"{v.module_name}_{_digest(v)}"
    return [root / name for root in _roots()]


def library_path(v: Variant) -> Path | None:
    """The built module of `v`, or None when it is not built yet."""
    for folder in build_dirs(v):
        path = folder / f"{v.module_name}.so"
        if path.is_file():
            return path
    return None


def estimated_minutes() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, math.ceil(_BUILD_CPU_S / min(cores or 1, len(SOURCES)) / 60))


def _import(v: Variant, path: Path) -> ModuleType:
    import torch  # noqa: F401 - the module links against libtorch, loaded by this import

    spec = importlib.util.spec_from_file_location(v.module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _writable_build_dir(v: Variant) -> Path:
    preferred, fallback = build_dirs(v)
    if _is_writable(preferred.parent):
        return preferred
    if not _is_writable(fallback.parent):
        raise OSError(f"neither {preferred.parent} nor {fallback.parent} is writable")
    logger.warning(
        "%s is not writable (TOKENMILL_HOME); building the native kernels in %s instead",
        preferred.parent, fallback.parent,
    )  # fmt: skip
    return fallback


class _Progress:
    """Reports each object file as ninja finishes it, with the time so far."""

    def __init__(self, folder: Path, report: Callable[[str], None]) -> None:
        self.folder, self.report = folder, report
        self.start = time.monotonic()
        self._seen: set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="native-build-progress")

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self._scan()

    def _watch(self) -> None:
        while not self._done.wait(0.5):
            self._scan()

    def _scan(self) -> None:
        for name in sorted(p.stem for p in self.folder.glob("*.o")):
            if name not in self._seen:
                self._seen.add(name)
                elapsed = time.monotonic() - self.start
                self.report(f"  [{len(self._seen)}/{len(SOURCES)}] {name}.cpp  {elapsed:.0f} s")


def build(v: Variant, report: Callable[[str], None] | None = None) -> Path:
    """Compile `v` unless it is built; returns the module's path. `report` gets progress lines."""
    path = library_path(v)
    if path is not None:
        return path
    folder = _writable_build_dir(v)
    folder.mkdir(parents=True, exist_ok=True)
    with PidLock(folder / "tokenmill.lock", _LOCK_TIMEOUT_S):
        path = folder / f"{v.module_name}.so"
        if path.is_file():  # built by the process we waited for
            return path
        baton = folder / _TORCH_BATON
        if baton.exists():
            logger.warning("removing torch's stale build lock %s (left by a killed build)", baton)
            baton.unlink(missing_ok=True)
        _compile(v, folder, report)
    return path


def _compile(v: Variant, folder: Path, report: Callable[[str], None] | None) -> None:
    from torch.utils.cpp_extension import load

    # Objects of an interrupted build may be truncated: ninja rebuilds what it has no record of.
    with _Progress(folder, report or (lambda line: logger.info("%s", line))):
        load(
            name=v.module_name,
            sources=[str(CSRC / name) for name in SOURCES],
            extra_cflags=list(v.cflags),
            build_directory=str(folder),
            verbose=False,
        )


def load(v: Variant) -> ModuleType:
    """The module of `v`, compiled first if it is not built yet."""
    path = build(v)
    try:
        return _import(v, path)
    except ImportError:
        # A library cut short (a build killed while linking): build it again.
        logger.warning("native kernels at %s do not load; building them again", path)
        path.unlink(missing_ok=True)
        return _import(v, build(v))
