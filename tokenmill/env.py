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
