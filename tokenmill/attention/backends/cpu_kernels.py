"""Native CPU kernels (tokenmill/csrc), compiled once per machine on first use and cached.

Returns None when they cannot be built (no compiler, not x86, build error): callers then keep
their pure-PyTorch path, so nothing depends on a compiler being present.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path

import torch

from tokenmill.env import home_dir

logger = logging.getLogger(__name__)

_SOURCES = (
    "bindings.cpp",
    "paged_attention_cpu.cpp",
    "gemm_bf16_cpu.cpp",
    "gemm_f32_cpu.cpp",
    "llama_decode_cpu.cpp",
    "argmax_cpu.cpp",
)
_HEADERS = ("kernels.h", "simd.h", "gemm_tiles.h")


def _cpu_signature() -> str:
    """Builds use -march=native: a cached build must only be reused on the same CPU kind."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                flags += line
    except OSError:
        flags = platform.processor()
    return flags


@functools.cache
def cpu_kernels():
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    sources = [str(csrc / name) for name in _SOURCES]
    digest = hashlib.sha256()
    for path in sources + [str(csrc / name) for name in _HEADERS]:
        digest.update(Path(path).read_bytes())
    digest.update((torch.__version__ + _cpu_signature()).encode())
    build_dir = home_dir() / "torch_extensions" / f"cpu_kernels_{digest.hexdigest()[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        from torch.utils.cpp_extension import load

        logger.info("building native CPU kernels in %s (first use only)", build_dir)
        return load(
            name="tokenmill_cpu_kernels",
            sources=sources,
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch path
        logger.warning("native CPU kernels unavailable (%s); using PyTorch ops", exc)
        return None
