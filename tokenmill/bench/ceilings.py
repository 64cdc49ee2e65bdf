"""What this machine can do at best, measured in the same run as the numbers compared to it:
dense matmul FLOP/s per dtype and memory bandwidth (a large copy: bytes read plus written)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ceilings:
    matmul_flops: dict[str, float]  # dtype name -> FLOP/s
    copy_bytes_per_s: float  # bytes read + written per second by a large tensor copy
    threads: int
    device: str


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(dtype: torch.dtype, n: int = 1024, device: str = "cpu", repeats: int = 8) -> float:
    """The faster of PyTorch's matmul and tokenmill's own (the native packed GEMMs on CPUs that
    have them): the ceiling is the best this machine's software reaches, not one library's."""
    from tokenmill.models.linear_ops import linear

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = min(
        _best_time(lambda: torch.mm(a, b), repeats), _best_time(lambda: linear(a, b), repeats)
    )
    return 2 * n**3 / best


def copy_bandwidth(num_bytes: int = 512 * 2**20, device: str = "cpu", repeats: int = 8) -> float:
    src = torch.ones(num_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / _best_time(lambda: dst.copy_(src), repeats)


def measure(dtypes: tuple[str, ...] = ("float32", "bfloat16"), device: str = "cpu") -> Ceilings:
    flops = {name: matmul_flops(getattr(torch, name), device=device) for name in dtypes}
    return Ceilings(flops, copy_bandwidth(device=device), torch.get_num_threads(), device)
