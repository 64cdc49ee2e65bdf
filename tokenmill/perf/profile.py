"""What one chip can do: memory tiers, peak compute per dtype, efficiencies and overheads.

A profile is single-chip physics. How chips are linked, what they cost and where a figure came
from live in the planner's hardware catalogue, which builds these profiles from data files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.errors import ConfigError

KINDS = ("weights", "kv", "activations")

# When a dtype has no peak of its own, the math runs at the first of these the chip has
# (no fp8 units: fp8 weights are upcast and run at bf16; a CPU without bf16 units runs fp32).
_PEAK_FALLBACK = {
    "fp8": ("bf16", "fp16", "fp32"),
    "int8": ("bf16", "fp16", "fp32"),
    "bf16": ("fp16", "fp32"),
    "fp16": ("bf16", "fp32"),
    "fp32": (),
}


@dataclass(frozen=True)
class MemoryTier:
    """One level of memory on a chip: on-chip SRAM, HBM, DDR.

    `holds` names what may live in the tier (weights, kv, activations). A GPU's L2 is a cache the
    runtime does not place weights in, so a GPU lists only HBM; an SRAM inference chip keeps
    everything in SRAM.
    """

    name: str
    capacity_bytes: float
    bandwidth_bytes_s: float
    holds: tuple[str, ...] = KINDS
    efficiency: float = 1.0  # achievable fraction of the bandwidth

    def __post_init__(self) -> None:
        if self.capacity_bytes <= 0 or self.bandwidth_bytes_s <= 0:
            raise ConfigError(f"memory tier {self.name!r}: capacity and bandwidth must be > 0")
        if not 0 < self.efficiency <= 1:
            raise ConfigError(f"memory tier {self.name!r}: efficiency must be in (0, 1]")
        unknown = set(self.holds) - set(KINDS)
        if unknown:
            raise ConfigError(f"memory tier {self.name!r}: unknown kinds {sorted(unknown)}")

    @property
    def effective_bandwidth(self) -> float:
        return self.bandwidth_bytes_s * self.efficiency


@dataclass(frozen=True)
class AttentionUnit:
    """A fixed-function attention engine: attention's FLOPs run here instead of the matmul units,
    while its K/V bytes still come from the tier that holds the KV cache."""

    peak_flops: float
    efficiency: float = 1.0


@dataclass(frozen=True)
class HardwareProfile:
    """The roofline parameters of one chip.

    Time of an operator = max(FLOPs / (peak * efficiency), bytes / effective bandwidth), or the
    sum of the two when `overlap_compute_memory` is False (CPUs that do not hide memory behind
    compute). A step adds `per_step_overhead_s`, `per_request_overhead_s` per scheduled request,
    `per_prefill_overhead_s` per request whose prompt runs in it (a CPU runtime that runs each
    prompt's attention apart from the batched decode) and `per_kernel_overhead_s` per operator
    launched. `step_jitter_cv` is the coefficient of
    variation of step time on dynamically scheduled hardware (0 for static schedules).
    """

    name: str
    tiers: tuple[MemoryTier, ...]
    peak_flops: dict[str, float] = field(hash=False)
    compute_efficiency: float = 1.0
    per_step_overhead_s: float = 0.0
    per_request_overhead_s: float = 0.0
    per_prefill_overhead_s: float = 0.0
    per_kernel_overhead_s: float = 0.0
    attention_unit: AttentionUnit | None = None
    overlap_compute_memory: bool = True
    step_jitter_cv: float = 0.0
    usable_memory_fraction: float = 0.9  # of weight/KV tiers; the rest is runtime workspace

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ConfigError(f"hardware {self.name!r} has no memory tiers")
        if not self.peak_flops or min(self.peak_flops.values()) <= 0:
            raise ConfigError(f"hardware {self.name!r} needs a positive peak for some dtype")
        if not 0 < self.compute_efficiency <= 1:
            raise ConfigError(f"hardware {self.name!r}: compute efficiency must be in (0, 1]")
        for kind in KINDS:
            if not any(kind in t.holds for t in self.tiers):
                raise ConfigError(f"hardware {self.name!r}: no memory tier holds {kind}")
        # Fastest first: placement fills them in this order.
        ordered = tuple(sorted(self.tiers, key=lambda t: -t.bandwidth_bytes_s))
        object.__setattr__(self, "tiers", ordered)

    def peak_for(self, dtype: str) -> float:
        """Peak FLOP/s for matmuls in `dtype`, following the fallback chain."""
        for candidate in (dtype, *_PEAK_FALLBACK.get(dtype, ())):
            if candidate in self.peak_flops:
                return self.peak_flops[candidate]
        known = ", ".join(self.peak_flops)
        raise ConfigError(f"hardware {self.name!r} has no {dtype} compute peak (has: {known})")

    def tier_for(self, kind: str, nbytes: float = 0.0) -> MemoryTier:
        """Where `kind` is read from: the fastest tier that may hold it and, for activations
        (which move in and out of caches), whose capacity fits the operator's working set."""
        candidates = [t for t in self.tiers if kind in t.holds]
        if kind == "activations":
            for tier in candidates:
                if tier.capacity_bytes >= nbytes:
                    return tier
            return candidates[-1]
        return candidates[0]

    def state_capacity_bytes(self) -> float:
        """Usable bytes for weights and KV cache on one chip: the tiers they are read from."""
        tiers = {self.tier_for("weights").name: self.tier_for("weights")}
        tiers[self.tier_for("kv").name] = self.tier_for("kv")
        return sum(t.capacity_bytes for t in tiers.values()) * self.usable_memory_fraction
