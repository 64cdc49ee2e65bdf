"""FLOPs and bytes of one engine step, operator by operator.

A step is any mix of prefill chunks and decode tokens: each scheduled request brings
`num_new_tokens` whose K/V are written this step, after `num_context_tokens` already cached.

    request i:  [ cached context c_i | new n_i ]
    new token j (0-based) attends to c_i + j + 1 keys, so the request's (query, key) pairs are
    n_i * c_i + n_i * (n_i + 1) / 2, and attention reads the K/V of c_i + n_i tokens once.

Only aggregates of the batch enter the formulas (a BatchShape, summed over one RequestShape per
request), which keeps a simulated step cheap. Each operator is counted as its own kernel that reads its inputs and writes its outputs; fused
kernels move fewer activation bytes, which the efficiency factors of a profile absorb.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from tokenmill.models.arch_config import ArchConfig
from tokenmill.perf.dtypes import Precision
from tokenmill.perf.kv_memory import kv_bytes_per_token_per_layer
from tokenmill.perf.model import layer_shapes

if TYPE_CHECKING:
    from tokenmill.engine.interfaces import ScheduledRequest, SchedulerOutput

LOGITS_BYTES = 4  # logits are produced and sampled in fp32


class RequestShape(NamedTuple):
    """One scheduled request of a step: `num_new_tokens` computed after `num_context_tokens`
    already cached, and `num_logits` rows of the lm_head (1 when it samples, k + 1 when it
    verifies k drafts, 0 for a prompt chunk that does not sample yet)."""

    num_new_tokens: int
    num_context_tokens: int
    num_logits: int = 1

    @classmethod
    def of(cls, s: ScheduledRequest) -> RequestShape:
        return cls(
            len(s.token_ids), s.num_computed_tokens, (1 + len(s.spec_token_ids)) * s.do_sample
        )

    @property
    def is_prompt(self) -> bool:
        """A prompt (or a chunk of one) runs: the request starts here, or computes tokens it does
        not sample from. A one-token last chunk after a cached prefix counts as a decode: the
        two cost the same."""
        return self.num_context_tokens == 0 or self.num_new_tokens > self.num_logits


def request_shapes(sched_out: SchedulerOutput) -> list[RequestShape]:
    return [RequestShape.of(s) for s in sched_out.scheduled]


@dataclass(frozen=True)
class BatchShape:
    """The aggregates of a step's batch that the cost formulas need."""

    num_tokens: int  # T: tokens computed this step
    num_reqs: int
    num_attn_pairs: int  # sum over (query, key) pairs, causal
    num_kv_read_tokens: int  # sum over requests of context + new tokens
    num_logits: int  # rows of the lm_head (one per sampling request; k+1 when verifying k drafts)
    num_prefill_tokens: int = 0
    num_prefill_reqs: int = 0  # requests whose prompt (or a chunk of it) runs this step

    @classmethod
    def from_requests(cls, requests: Iterable[RequestShape | tuple[int, ...]]) -> BatchShape:
        """From a RequestShape, or a (num_new_tokens, num_context_tokens[, num_logits]) tuple,
        per scheduled request."""
        num_tokens = num_reqs = pairs = kv_read = logits = prefill = prefill_reqs = 0
        for item in requests:
            req = item if isinstance(item, RequestShape) else RequestShape(*item)
            n, c = req.num_new_tokens, req.num_context_tokens
            num_tokens += n
            num_reqs += 1
            pairs += n * c + n * (n + 1) // 2
            kv_read += c + n
            logits += req.num_logits
            if req.is_prompt:
                prefill += n
                prefill_reqs += 1
        return cls(num_tokens, num_reqs, pairs, kv_read, logits, prefill, prefill_reqs)

    @property
    def has_prompt_tokens(self) -> bool:
        return self.num_prefill_tokens > 0


@dataclass(frozen=True)
class OpCost:
    """One operator of a step. Per-layer operators run num_layers times."""

    name: str
    kind: str  # matmul | attention | elementwise | gather
    flops: float
    weight_bytes: float  # for a gather: the rows read, which scale with tokens
    act_bytes: float
    kv_read_bytes: float = 0.0
    kv_write_bytes: float = 0.0
    per_layer: bool = True
    compute_dtype: str = "bf16"

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.act_bytes + self.kv_read_bytes + self.kv_write_bytes


@dataclass(frozen=True)
class StepCost:
    batch: BatchShape
    num_layers: int
    ops: tuple[OpCost, ...]

    def _times(self, op: OpCost) -> int:
        return self.num_layers if op.per_layer else 1

    @property
    def flops(self) -> float:
        return sum(op.flops * self._times(op) for op in self.ops)

    @property
    def bytes_by_kind(self) -> dict[str, float]:
        out = {"weights": 0.0, "kv_read": 0.0, "kv_write": 0.0, "activations": 0.0}
        for op in self.ops:
            times = self._times(op)
            out["weights"] += op.weight_bytes * times
            out["kv_read"] += op.kv_read_bytes * times
            out["kv_write"] += op.kv_write_bytes * times
            out["activations"] += op.act_bytes * times
        return out

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes_by_kind.values())

    @property
    def num_kernels(self) -> int:
        return sum(self._times(op) for op in self.ops)

    def flops_by_op(self) -> dict[str, float]:
        return {op.name: op.flops * self._times(op) for op in self.ops}


def _as_batch(batch: BatchShape | SchedulerOutput | Iterable[tuple[int, ...]]) -> BatchShape:
    if isinstance(batch, BatchShape):
        return batch
    if hasattr(batch, "scheduled"):
        return BatchShape.from_requests(request_shapes(batch))  # type: ignore[arg-type]
    return BatchShape.from_requests(batch)  # type: ignore[arg-type]


def step_cost(
    arch: ArchConfig,
    batch: BatchShape | SchedulerOutput | Iterable[tuple[int, ...]],
    precision: Precision | None = None,
) -> StepCost:
    """FLOPs and bytes of one step of `batch`: a BatchShape, a SchedulerOutput, or a
    RequestShape (or its tuple) per scheduled request."""
    shape = _as_batch(batch)
    precision = precision or Precision()
    ops = _layer_ops(arch, shape, precision) + _edge_ops(arch, shape, precision)
    return StepCost(shape, arch.num_hidden_layers, ops)


def _layer_ops(arch: ArchConfig, b: BatchShape, p: Precision) -> tuple[OpCost, ...]:
    T, a, h = b.num_tokens, p.act_bytes, arch.hidden_size
    d, nh, nkv, inter = (
        arch.head_dim,
        arch.num_attention_heads,
        arch.num_key_value_heads,
        (arch.intermediate_size),
    )
    wf, mm = p.weight_format, p.weight_format.compute_dtype
    shapes = layer_shapes(arch)
    qkv_out = shapes.qkv[0]
    kv_tok = kv_bytes_per_token_per_layer(arch, p.kv)
    qkv_bias = qkv_out * a if arch.attention_bias else 0.0
    mlp_bias = (2 * inter + h) * a if arch.mlp_bias else 0.0
    norm = OpCost("input_norm", "elementwise", 4 * T * h, h * a, 2 * T * h * a)
    residual = OpCost("attn_residual", "elementwise", T * h, 0.0, 3 * T * h * a)
    return (
        norm,
        OpCost("qkv_proj", "matmul", 2 * T * h * qkv_out, wf.nbytes(qkv_out, h) + qkv_bias,
               T * (h + qkv_out) * a, compute_dtype=mm),
        OpCost("rope", "elementwise", 3 * T * (nh + nkv) * d, 0.0, 2 * T * (nh + nkv) * d * a),
        OpCost("kv_write", "elementwise", 0.0, 0.0, 2 * T * nkv * d * a, kv_write_bytes=T * kv_tok),
        OpCost("attention", "attention", 4 * nh * d * b.num_attn_pairs, 0.0, 2 * T * nh * d * a,
               kv_read_bytes=b.num_kv_read_tokens * kv_tok, compute_dtype=p.activations),
        OpCost("o_proj", "matmul", 2 * T * nh * d * h, wf.nbytes(h, nh * d),
               T * (nh * d + h) * a, compute_dtype=mm),
        residual,
        OpCost("post_attn_norm", "elementwise", norm.flops, norm.weight_bytes, norm.act_bytes),
        OpCost("gate_up_proj", "matmul", 4 * T * h * inter,
               wf.nbytes(2 * inter, h) + mlp_bias, T * (h + 2 * inter) * a, compute_dtype=mm),
        OpCost("act_mul", "elementwise", 5 * T * inter, 0.0, 3 * T * inter * a),
        OpCost("down_proj", "matmul", 2 * T * inter * h, wf.nbytes(h, inter),
               T * (inter + h) * a, compute_dtype=mm),
        OpCost("mlp_residual", "elementwise", residual.flops, 0.0, residual.act_bytes),
    )  # fmt: skip


def _edge_ops(arch: ArchConfig, b: BatchShape, p: Precision) -> tuple[OpCost, ...]:
    T, S, a, h, V = b.num_tokens, b.num_logits, p.act_bytes, arch.hidden_size, arch.vocab_size
    return (
        OpCost("embedding", "gather", 0.0, T * h * a, T * h * a, per_layer=False),
        OpCost("final_norm", "elementwise", 4 * T * h, h * a, 2 * T * h * a, per_layer=False),
        OpCost("lm_head", "matmul", 2 * S * h * V, V * h * a, S * h * a + S * V * LOGITS_BYTES,
               per_layer=False, compute_dtype=p.activations),
        OpCost("sampling", "elementwise", 5 * S * V, 0.0, S * V * LOGITS_BYTES, per_layer=False),
    )  # fmt: skip
