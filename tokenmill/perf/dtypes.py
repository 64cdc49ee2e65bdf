"""Number formats for weights, KV cache and activations, and the precision of a deployment.

A format's storage cost counts group-wise scales: `int4` with groups of 128 and a bf16 scale costs
4 + 16/128 = 4.125 bits per weight. What the math runs in follows from the weight format:
weight-only int8/int4 dequantize to bf16 (W8A16, W4A16); fp8 weights run fp8 matmuls (W8A8, the
activations quantized per token), which is what fp8 serving does on hardware that has fp8 units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenmill.errors import ConfigError


@dataclass(frozen=True)
class NumberFormat:
    name: str
    bits: int
    # Elements that share one scale, along a row; None: one scale per row (when scale_bytes > 0).
    group_size: int | None = None
    scale_bytes: int = 0  # bytes of scale (and zero point, if any) per group
    compute_dtype: str = "bf16"  # peak-compute key the matmuls use when these are the weights

    def nbytes(self, num_rows: float, row_len: int) -> float:
        """Bytes of a (num_rows, row_len) tensor in this format, scales included."""
        data = num_rows * row_len * self.bits / 8
        if not self.scale_bytes:
            return data
        group = self.group_size or row_len
        return data + num_rows * math.ceil(row_len / group) * self.scale_bytes

    @property
    def bytes_per_element(self) -> float:
        return self.bits / 8


WEIGHT_FORMATS: dict[str, NumberFormat] = {
    "fp32": NumberFormat("fp32", 32, compute_dtype="fp32"),
    "bf16": NumberFormat("bf16", 16, compute_dtype="bf16"),
    "fp16": NumberFormat("fp16", 16, compute_dtype="fp16"),
    # Per-tensor scale: a few bytes per matrix, not counted.
    "fp8": NumberFormat("fp8", 8, compute_dtype="fp8"),
    # Weight-only, symmetric, group-wise along the input dimension with a bf16 scale per group.
    "int8": NumberFormat("int8", 8, group_size=128, scale_bytes=2, compute_dtype="bf16"),
    "int4": NumberFormat("int4", 4, group_size=128, scale_bytes=2, compute_dtype="bf16"),
}

KV_FORMATS: dict[str, NumberFormat] = {
    "fp32": NumberFormat("fp32", 32, compute_dtype="fp32"),
    "bf16": NumberFormat("bf16", 16, compute_dtype="bf16"),
    "fp16": NumberFormat("fp16", 16, compute_dtype="fp16"),
    "fp8": NumberFormat("fp8", 8, compute_dtype="bf16"),  # per-tensor scale
    # One bf16 scale per (token, kv head) vector of head_dim values.
    "int8": NumberFormat("int8", 8, group_size=None, scale_bytes=2, compute_dtype="bf16"),
}

ACTIVATION_FORMATS: dict[str, NumberFormat] = {
    name: WEIGHT_FORMATS[name] for name in ("fp32", "bf16", "fp16")
}

_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "auto": None}


def _canonical(name: str | None) -> str | None:
    if name is None:
        return None
    name = name.lower()
    return _ALIASES.get(name, name)


def _lookup(table: dict[str, NumberFormat], name: str, what: str) -> NumberFormat:
    if name not in table:
        raise ConfigError(f"unknown {what} dtype {name!r}; known: {', '.join(table)}")
    return table[name]


@dataclass(frozen=True)
class Precision:
    """Number formats of one deployment. kv and activations default from the weights:
    activations are fp32 when the weights are fp32 and bf16 otherwise; the KV cache follows the
    activations. Embedding and lm_head tables stay at the activation dtype (quantizers commonly
    leave them unquantized)."""

    weights: str = "bf16"
    kv: str | None = None
    activations: str | None = None

    def __post_init__(self) -> None:
        weights = _canonical(self.weights)
        act = _canonical(self.activations) or ("fp32" if weights == "fp32" else "bf16")
        kv = _canonical(self.kv) or act
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "activations", act)
        object.__setattr__(self, "kv", kv)
        _lookup(WEIGHT_FORMATS, weights, "weights")
        _lookup(KV_FORMATS, kv, "KV cache")
        _lookup(ACTIVATION_FORMATS, act, "activation")

    @property
    def weight_format(self) -> NumberFormat:
        return WEIGHT_FORMATS[self.weights]

    @property
    def kv_format(self) -> NumberFormat:
        return KV_FORMATS[self.kv]

    @property
    def act_format(self) -> NumberFormat:
        return ACTIVATION_FORMATS[self.activations]

    @property
    def act_bytes(self) -> float:
        return self.act_format.bytes_per_element

    def describe(self) -> str:
        return f"weights {self.weights}, KV {self.kv}, activations {self.activations}"
