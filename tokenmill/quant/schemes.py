"""The `quantization` option: which weights a model computes on, as a parsed scheme.

  none            dequantize to the model dtype (a GGUF's blocks become floats)
  gguf            keep a GGUF file's own blocks (float tensors in it stay float)
  int8            8-bit per output channel; int8-gN: per group of N k
  int4            4-bit asymmetric per group of 32; int4-gN (N = 32, 64, 128), -sym: symmetric
  ...-a16         any of gguf, int8*, int4* with 16-bit activations: each activation block is
                  rounded to int8 and so is what that rounding left, two integer dot products
                  per weight byte instead of one (near-float logits; measured on the bundled
                  models: batch-1 decode 0.82-1.04x, batch 64 0.45x the 8-bit path's speed,
                  BENCHMARKS.md 7.2)
  auto            gguf for a GGUF file holding quantized blocks where the native integer kernels
                  run (they beat the float path at every batch size there, BENCHMARKS.md),
                  else none

With int8/int4 the embedding table and the output head are held as int8 per channel: the head
is where 4-bit rounding costs most quality for the least memory.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from tokenmill.errors import ConfigError

_PATTERN = re.compile(r"(?P<kind>int8|int4)(?:-g(?P<group>\d+))?(?P<sym>-sym)?")
INT4_GROUPS = (32, 64, 128)
_A16 = "-a16"


@dataclass(frozen=True)
class QuantScheme:
    kind: str  # none | gguf | int8 | int4 | auto
    group: int | None = None  # None: per channel (int8)
    symmetric: bool = True
    act_bits: int = 8  # activations as the integer kernel takes them: int8, or two int8 passes

    @property
    def name(self) -> str:
        suffix = _A16 if self.act_bits == 16 else ""
        if self.kind not in ("int8", "int4"):
            return self.kind + suffix
        group = "" if self.group is None else f"-g{self.group}"
        sym = "-sym" if self.kind == "int4" and self.symmetric else ""
        return f"{self.kind}{group}{sym}{suffix}"


def parse_quantization(value: str | None) -> QuantScheme:
    """A `quantization` string -> QuantScheme (None: "none", as vLLM's LLM takes it); a clear
    ConfigError for anything else."""
    if value is None:
        return QuantScheme("none")
    if not isinstance(value, str):
        raise ConfigError(f"quantization must be a string or None, got {value!r}")
    if value.endswith(_A16):
        weights = value[: -len(_A16)]
        if weights in ("none", "auto", "") or weights.endswith(_A16):
            raise ConfigError(
                f"quantization {value!r}: -a16 needs integer weights (gguf, int8, int4)"
            )
        return dataclasses.replace(parse_quantization(weights), act_bits=16)
    if value in ("none", "gguf", "auto"):
        return QuantScheme(value)
    match = _PATTERN.fullmatch(value)
    if match is None:
        raise ConfigError(
            "quantization must be none, gguf, auto, int8[-gN] or int4[-gN][-sym] (the integer "
            f"ones optionally with -a16), got {value!r}"
        )
    kind, group = match["kind"], match["group"]
    if kind == "int4":
        group = int(group or 32)
        if group not in INT4_GROUPS:
            raise ConfigError(f"int4 group must be one of {INT4_GROUPS}, got {group}")
        return QuantScheme("int4", group, symmetric=bool(match["sym"]))
    if match["sym"]:
        raise ConfigError("int8 is symmetric already; drop the -sym suffix")
    if group is not None and (int(group) < 32 or int(group) % 32):
        raise ConfigError(f"int8 group must be a multiple of 32, got {group}")
    return QuantScheme("int8", None if group is None else int(group))


def resolve_quantization(value: str, loaded, device: str) -> QuantScheme:
    """The scheme `value` names, with auto settled for this model and machine."""
    scheme = parse_quantization(value)
    if scheme.kind != "auto":
        return scheme
    if loaded.iter_blocks is None or device != "cpu" or not _native_integer_kernels():
        return QuantScheme("none")
    return QuantScheme("gguf") if any(True for _ in loaded.iter_blocks()) else QuantScheme("none")


def _native_integer_kernels() -> bool:
    from tokenmill.native import kernels

    native = kernels()
    return native is not None and native.has_avx512_vnni()
