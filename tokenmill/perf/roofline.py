"""Roofline time of a step on one chip.

Each operator takes max(compute time, memory time) (or their sum on profiles that do not
overlap them); memory time is the slowest tier's bytes / effective bandwidth when an operator
reads from several tiers at once. Overheads come on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.perf.profile import HardwareProfile
from tokenmill.perf.step_cost import BatchShape, OpCost, StepCost


@dataclass(frozen=True)
class RooflineTime:
    seconds: float
    compute_s: float  # sum over operators of their compute time
    memory_s: float  # sum over operators of their memory time
    overhead_s: float

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def op_times(
    op: OpCost,
    profile: HardwareProfile,
    token_scale: float = 1.0,
    shard: float = 1.0,
    kv_shard: float = 1.0,
) -> tuple[float, float]:
    """(compute_s, memory_s) of one operator on one chip.

    token_scale: fraction of the batch's tokens this chip runs at once (pipeline micro-batches).
    shard: how many chips split this operator (tensor parallelism); kv_shard: how many split its
    K/V (at most the number of KV heads; beyond that heads are replicated).
    """
    flops = op.flops * token_scale / shard
    if op.kind == "attention" and profile.attention_unit is not None:
        unit = profile.attention_unit
        compute = flops / (unit.peak_flops * unit.efficiency)
    elif flops:
        compute = flops / (profile.peak_for(op.compute_dtype) * profile.compute_efficiency)
    else:
        compute = 0.0
    weights = op.weight_bytes / shard * (token_scale if op.kind == "gather" else 1.0)
    act = op.act_bytes * token_scale / shard
    kv = (op.kv_read_bytes + op.kv_write_bytes) * token_scale / kv_shard
    per_tier: dict[str, float] = {}
    for kind, nbytes in (("weights", weights), ("kv", kv), ("activations", act)):
        if nbytes:
            tier = profile.tier_for(kind, nbytes)
            per_tier[tier.name] = per_tier.get(tier.name, 0.0) + nbytes / tier.effective_bandwidth
    memory = max(per_tier.values(), default=0.0)
    return compute, memory


def combine(profile: HardwareProfile, compute_s: float, memory_s: float) -> float:
    if profile.overlap_compute_memory:
        return max(compute_s, memory_s)
    return compute_s + memory_s


def step_overhead(profile: HardwareProfile, batch: BatchShape, num_kernels: int) -> float:
    return (
        profile.per_step_overhead_s
        + profile.per_request_overhead_s * batch.num_reqs
        + profile.per_prefill_overhead_s * batch.num_prefill_reqs
        + profile.per_kernel_overhead_s * num_kernels
    )


def roofline_time(cost: StepCost, profile: HardwareProfile) -> RooflineTime:
    """Time of one step on one chip holding the whole model."""
    total = compute_sum = memory_sum = 0.0
    for op in cost.ops:
        times = cost.num_layers if op.per_layer else 1
        compute, memory = op_times(op, profile)
        total += combine(profile, compute, memory) * times
        compute_sum += compute * times
        memory_sum += memory * times
    overhead = step_overhead(profile, cost.batch, cost.num_kernels)
    return RooflineTime(total + overhead, compute_sum, memory_sum, overhead)
