"""Workloads named by a short string, as the `plan` and `bench serve` commands take them.

fixed:in=1000,out=1000            every request 1000 prompt and 1000 output tokens
random:in=1000,out=200,range=0.5  lengths uniform in [len * 0.5, len * 1.5]
sharegpt                          ShareGPT V3 (needs a tokenizer)
sharegpt:out=256                  ShareGPT prompts with a fixed output length
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.errors import ConfigError
from tokenmill.workload.arrivals import ArrivalSpec
from tokenmill.workload.sharegpt import TextEncoder, sample_sharegpt
from tokenmill.workload.synthetic import fixed_lengths, random_lengths
from tokenmill.workload.types import Workload, WorkloadRequest

KINDS = ("fixed", "random", "sharegpt")
_KEYS = {"fixed": {"in", "out"}, "random": {"in", "out", "range"}, "sharegpt": {"out"}}


@dataclass(frozen=True)
class LengthSpec:
    kind: str  # fixed | random | sharegpt
    input_len: int | None = None
    output_len: int | None = None
    range_ratio: float = 0.0

    @property
    def needs_tokenizer(self) -> bool:
        return self.kind == "sharegpt"

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed lengths: {self.input_len} in, {self.output_len} out"
        if self.kind == "random":
            return f"random lengths: {self.input_len} in, {self.output_len} out, ±{self.range_ratio:.0%}"
        out = f", {self.output_len} out" if self.output_len else ""
        return f"ShareGPT V3{out}"


def parse_workload(text: str) -> LengthSpec:
    """Parse `kind[:key=value,...]`; raises ConfigError naming what is wrong."""
    kind, _, rest = text.strip().partition(":")
    kind = kind.lower()
    if kind not in KINDS:
        raise ConfigError(f"unknown workload {kind!r}; use one of: {', '.join(KINDS)}")
    values: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in _KEYS[kind]:
            known = ", ".join(sorted(_KEYS[kind]))
            raise ConfigError(f"workload {kind}: bad option {item!r} (options: {known})")
        values[key] = value
    try:
        spec = LengthSpec(
            kind,
            int(values["in"]) if "in" in values else None,
            int(values["out"]) if "out" in values else None,
            float(values.get("range", 0.0)),
        )
    except ValueError as exc:
        raise ConfigError(f"workload {text!r}: {exc}") from exc
    if kind != "sharegpt" and (spec.input_len is None or spec.output_len is None):
        raise ConfigError(f"workload {kind} needs in= and out=, e.g. {kind}:in=1000,out=200")
    for name, value in (("in", spec.input_len), ("out", spec.output_len)):
        if value is not None and value < 1:
            raise ConfigError(f"workload {text!r}: {name} must be >= 1 token, got {value}")
    return spec


def build_workload(
    spec: LengthSpec | str,
    num_requests: int,
    arrivals: ArrivalSpec | None = None,
    tokenizer: TextEncoder | None = None,
    seed: int = 0,
) -> Workload:
    """`num_requests` requests of `spec`, sent as `arrivals` says (default: all at once)."""
    spec = parse_workload(spec) if isinstance(spec, str) else spec
    arrivals = arrivals or ArrivalSpec()
    if num_requests < 1:
        raise ConfigError(f"number of requests must be >= 1, got {num_requests}")
    if spec.kind == "sharegpt":
        if tokenizer is None:
            raise ConfigError("the ShareGPT workload needs a tokenizer to measure lengths")
        base = sample_sharegpt(tokenizer, num_requests, seed, fixed_output_len=spec.output_len)
    else:
        if spec.kind == "fixed":
            lengths = fixed_lengths(num_requests, spec.input_len, spec.output_len)
        else:
            lengths = random_lengths(
                num_requests, spec.input_len, spec.output_len, spec.range_ratio, seed
            )
        base = [WorkloadRequest(None, i, o) for i, o in lengths]
    offsets = arrivals.offsets(num_requests, seed)
    requests = tuple(
        WorkloadRequest(r.prompt, r.prompt_len, r.output_len, t)
        for r, t in zip(base, offsets, strict=True)
    )
    description = f"{spec.describe()}; {num_requests} requests, {arrivals.describe()}"
    return Workload(requests, arrivals.max_concurrency, description)
