"""Every environment variable tokenmill reads, read here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    """TOKENMILL_HOME: caches and calibration files (default ~/.cache/tokenmill)."""
    return Path(os.environ.get("TOKENMILL_HOME") or Path.home() / ".cache" / "tokenmill")


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in Triton's CPU interpreter (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def native_mode() -> str:
    """TOKENMILL_NATIVE: which native CPU kernels run. "native" (default: compiled for this CPU,
    -march=native), "portable" (AVX2 on x86, plain -O3 elsewhere), or "off" ("0": PyTorch ops
    everywhere)."""
    value = os.environ.get("TOKENMILL_NATIVE", "").strip().lower()
    if value in ("", "1", "on", "native"):
        return "native"
    if value in ("0", "off"):
        return "off"
    if value == "portable":
        return "portable"
    from tokenmill.errors import ConfigError

    raise ConfigError(f"TOKENMILL_NATIVE must be native, portable or 0 (off), got {value!r}")
