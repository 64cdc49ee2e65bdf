"""What this machine's CPU offers, read once from /proc/cpuinfo (empty where there is none)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def _cpuinfo_lines() -> tuple[str, ...]:
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def cpu_flags() -> frozenset[str]:
    """The first processor's feature flags (x86 `flags`, Arm `Features`)."""
    for line in _cpuinfo_lines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model_name() -> str:
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_computes_bf16() -> bool:
    """The CPU has native bfloat16 dot products (AVX512-BF16 or AMX-BF16), where bfloat16
    inference runs 2-2.5x faster than float32 (BENCHMARKS.md)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
