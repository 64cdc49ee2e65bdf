"""Synthetic request lengths: fixed, or uniform in a range around a mean (vLLM's random dataset:
integers in [len * (1 - range_ratio), len * (1 + range_ratio)])."""

from __future__ import annotations

import numpy as np

from tokenmill.errors import ConfigError


def fixed_lengths(num_requests: int, input_len: int, output_len: int) -> list[tuple[int, int]]:
    _check_lengths(input_len, output_len)
    return [(input_len, output_len)] * num_requests


def random_lengths(
    num_requests: int, input_len: int, output_len: int, range_ratio: float, seed: int = 0
) -> list[tuple[int, int]]:
    _check_lengths(input_len, output_len)
    if not 0 <= range_ratio < 1:
        raise ConfigError(f"range ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    ins = _uniform(rng, input_len, range_ratio, num_requests)
    outs = _uniform(rng, output_len, range_ratio, num_requests)
    return list(zip(ins, outs, strict=True))


def _uniform(rng: np.random.Generator, mean: int, ratio: float, size: int) -> list[int]:
    low = max(1, int(mean * (1 - ratio)))
    high = max(low, int(mean * (1 + ratio)))
    return rng.integers(low, high + 1, size=size).tolist()


def _check_lengths(input_len: int, output_len: int) -> None:
    if input_len < 1 or output_len < 1:
        raise ConfigError(
            f"input and output lengths must be >= 1 token, got in={input_len}, out={output_len}"
        )
