"""Time of one engine step on a placed model: per-chip roofline plus tensor- and pipeline-parallel
communication.

Tensor parallel: each chip runs 1/tp of every matmul, of the attention heads (of the KV heads up
to one per chip) and of the vocabulary; norms and residuals are replicated. Two all-reduces of the
hidden states per layer, one for the embedding, an all-gather of the logits.

On hardware that overlaps communication with the weight stream (`overlaps_communication`: the
SN40L's streaming dataflow), a layer takes max(layer work, its all-reduces) instead of their sum.

Pipeline parallel: one scheduler step advances every scheduled request by its tokens. The batch is
cut into m = min(pp, num_reqs) micro-batches that follow each other through the stages, so

    step = max(m * slowest stage, sum of stages + (pp - 1) hops)      (stage times at 1/m batch)

the first term when the pipeline is full, the second when a micro-batch's trip through all stages
is the longer wait (small batches, many stages: an SRAM chip's regime).
"""

from __future__ import annotations

import math

from tokenmill.models.arch_config import ArchConfig
from tokenmill.perf.dtypes import Precision
from tokenmill.perf.roofline import combine, op_times
from tokenmill.perf.step_cost import BatchShape, OpCost, step_cost
from tokenmill.plan.hardware import HardwareSpec, LinkSpec
from tokenmill.plan.placement import Placement

_REPLICATED = frozenset(
    {"input_norm", "post_attn_norm", "attn_residual", "mlp_residual", "final_norm"}
)
_HEAD_OPS = frozenset({"final_norm", "lm_head", "sampling"})


class LayoutStepTime:
    """Step time of a model placed on chips; one per (model, hardware, precision, placement)."""

    def __init__(
        self, arch: ArchConfig, hw: HardwareSpec, precision: Precision, placement: Placement
    ) -> None:
        self.arch, self.hw, self.precision, self.placement = arch, hw, precision, placement
        self.profile = hw.profile
        per_replica = placement.chips_per_replica
        self.tp_link = self._link(placement.tp)
        self.pp_link = self._link(per_replica)
        self.kv_shard = min(placement.tp, arch.num_key_value_heads)

    def _link(self, width: int) -> LinkSpec:
        if width <= self.hw.scale_up.domain_size or self.hw.scale_out is None:
            return self.hw.scale_up
        return self.hw.scale_out

    def seconds(self, batch: BatchShape) -> float:
        pl, prof = self.placement, self.profile
        cost = step_cost(self.arch, batch, self.precision)
        m = max(1, min(pl.pp, batch.num_reqs))
        scale = 1.0 / m
        layer_s, embed_s, head_s = self._op_groups(cost.ops, scale)
        layer_ops = sum(1 for op in cost.ops if op.per_layer)
        hidden_bytes = batch.num_tokens * scale * self.arch.hidden_size * self.precision.act_bytes
        logits_bytes = batch.num_logits * scale * self.arch.vocab_size * 4
        tp_layer = 2 * self._all_reduce(hidden_bytes)
        tp_embed = self._all_reduce(hidden_bytes)
        tp_head = self._all_gather(logits_bytes)
        kernel = prof.per_kernel_overhead_s
        stages = []
        # A dataflow chip streams the next layer's weights while this layer's all-reduce is on the
        # links (no data dependence at decode): the layer takes the longer of the two.
        layer_tp = max(layer_s, tp_layer) if self.hw.overlaps_communication else layer_s + tp_layer
        for st in pl.stages:
            t = st.num_layers * (layer_tp + layer_ops * kernel)
            if st.has_embedding:
                t += embed_s + tp_embed + kernel
            if st.has_head:
                t += head_s + tp_head + len(_HEAD_OPS) * kernel
            stages.append(t)
        hop = self.pp_link.latency_s + hidden_bytes / self.pp_link.bandwidth_bytes_s
        if pl.pp > 1:
            trip = sum(stages) + (pl.pp - 1) * hop
            busy = m * max(stages)
            step = max(trip, busy)
        else:
            step = stages[0]
        overhead = (
            prof.per_step_overhead_s
            + prof.per_request_overhead_s * batch.num_reqs
            + prof.per_prefill_overhead_s * batch.num_prefill_reqs
        )
        return step + overhead

    def _op_groups(self, ops: tuple[OpCost, ...], scale: float) -> tuple[float, float, float]:
        """Per-chip time of one layer, of the embedding, and of the head, at `scale` batch."""
        layer = embed = head = 0.0
        tp, prof = self.placement.tp, self.profile
        for op in ops:
            shard = 1 if op.name in _REPLICATED else tp
            compute, memory = op_times(op, prof, scale, shard, self.kv_shard)
            t = combine(prof, compute, memory)
            if op.per_layer:
                layer += t
            elif op.name in _HEAD_OPS:
                head += t
            else:
                embed += t
        return layer, embed, head

    def _all_reduce(self, nbytes: float) -> float:
        tp = self.placement.tp
        if tp == 1 or nbytes == 0:
            return 0.0
        link = self.tp_link
        hops = 2 * math.ceil(math.log2(tp))
        return 2 * (tp - 1) / tp * nbytes / link.bandwidth_bytes_s + hops * link.latency_s

    def _all_gather(self, nbytes: float) -> float:
        tp = self.placement.tp
        if tp == 1 or nbytes == 0:
            return 0.0
        link = self.tp_link
        hops = math.ceil(math.log2(tp))
        return (tp - 1) / tp * nbytes / link.bandwidth_bytes_s + hops * link.latency_s
