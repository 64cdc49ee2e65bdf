"""The physics shared by the planner and the benchmark reports: what a step of a model costs in
FLOPs and bytes, and how long it takes on a hardware profile.

    cost = step_cost(arch, [(512, 0), (1, 900), (1, 40)], Precision(weights="fp8"))
    roofline_time(cost, profile).seconds
"""

from tokenmill.perf.dtypes import KV_FORMATS, WEIGHT_FORMATS, NumberFormat, Precision
from tokenmill.perf.kv_memory import kv_bytes_per_block, kv_bytes_per_token, num_kv_blocks
from tokenmill.perf.model import layer_weight_bytes, model_flops_per_token, num_params, weight_bytes
from tokenmill.perf.profile import AttentionUnit, HardwareProfile, MemoryTier
from tokenmill.perf.roofline import RooflineTime, roofline_time
from tokenmill.perf.step_cost import BatchShape, OpCost, StepCost, step_cost
from tokenmill.perf.trace import StepRecord, first_schedule_mismatch, read_trace, write_trace

__all__ = [
    "KV_FORMATS",
    "WEIGHT_FORMATS",
    "AttentionUnit",
    "BatchShape",
    "HardwareProfile",
    "MemoryTier",
    "NumberFormat",
    "OpCost",
    "Precision",
    "RooflineTime",
    "StepCost",
    "StepRecord",
    "first_schedule_mismatch",
    "kv_bytes_per_block",
    "kv_bytes_per_token",
    "layer_weight_bytes",
    "model_flops_per_token",
    "num_kv_blocks",
    "num_params",
    "read_trace",
    "roofline_time",
    "step_cost",
    "weight_bytes",
    "write_trace",
]
