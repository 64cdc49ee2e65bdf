"""Sizes of a Llama-family model: parameters, weight bytes, FLOPs per token (KV bytes: kv_memory).

Every linear layer is a (out_features, in_features) matrix; group-wise scales run along the input
dimension. The embedding table and lm_head are kept at the activation dtype (see Precision).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.models.arch_config import ArchConfig
from tokenmill.perf.dtypes import WEIGHT_FORMATS, Precision


@dataclass(frozen=True)
class LayerShapes:
    """The linear matrices of one decoder layer, (out_features, in_features) each."""

    qkv: tuple[int, int]
    o: tuple[int, int]
    gate_up: tuple[int, int]
    down: tuple[int, int]

    @property
    def matrices(self) -> tuple[tuple[int, int], ...]:
        return (self.qkv, self.o, self.gate_up, self.down)

    @property
    def num_params(self) -> int:
        return sum(out * inp for out, inp in self.matrices)


def layer_shapes(arch: ArchConfig) -> LayerShapes:
    h, d = arch.hidden_size, arch.head_dim
    q_dim, kv_dim = arch.num_attention_heads * d, arch.num_key_value_heads * d
    return LayerShapes(
        qkv=(q_dim + 2 * kv_dim, h),
        o=(h, q_dim),
        gate_up=(2 * arch.intermediate_size, h),
        down=(h, arch.intermediate_size),
    )


def _small_params_per_layer(arch: ArchConfig) -> int:
    """Norm weights and biases of one layer: kept at the activation dtype."""
    shapes = layer_shapes(arch)
    count = 2 * arch.hidden_size  # input and post-attention RMSNorm
    if arch.attention_bias:
        count += shapes.qkv[0]
    if arch.mlp_bias:
        count += shapes.gate_up[0] + shapes.down[0]
    return count


def num_params(arch: ArchConfig) -> int:
    """All parameters, embedding and (untied) lm_head included."""
    layer = layer_shapes(arch).num_params + _small_params_per_layer(arch)
    tables = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    return arch.num_hidden_layers * layer + tables + arch.hidden_size


def num_matmul_params(arch: ArchConfig) -> int:
    """Parameters that take part in a matmul per token: the layers' linears and the lm_head."""
    return (
        arch.num_hidden_layers * layer_shapes(arch).num_params + arch.vocab_size * arch.hidden_size
    )


def layer_weight_bytes(arch: ArchConfig, precision: Precision) -> float:
    """Bytes of one decoder layer's weights (linears at the weight format, norms/biases not)."""
    fmt = precision.weight_format
    linears = sum(fmt.nbytes(out, inp) for out, inp in layer_shapes(arch).matrices)
    return linears + _small_params_per_layer(arch) * precision.act_bytes


def table_bytes(arch: ArchConfig, precision: Precision) -> float:
    """Bytes of one vocab x hidden table (embedding or lm_head), at the activation dtype."""
    return arch.vocab_size * arch.hidden_size * precision.act_bytes


def weight_bytes(arch: ArchConfig, dtype: str | Precision = "bf16") -> float:
    """Bytes of all weights. `dtype` names the linear layers' format (fp32, bf16, fp8, int8,
    int4) or is a whole Precision."""
    precision = dtype if isinstance(dtype, Precision) else Precision(weights=dtype)
    if precision.weights not in WEIGHT_FORMATS:  # pragma: no cover - Precision validates
        raise AssertionError(precision.weights)
    num_tables = 1 if arch.tie_word_embeddings else 2
    return (
        arch.num_hidden_layers * layer_weight_bytes(arch, precision)
        + num_tables * table_bytes(arch, precision)
        + arch.hidden_size * precision.act_bytes  # final norm
    )


def model_flops_per_token(arch: ArchConfig, context_len: int) -> float:
    """Forward FLOPs of one token that attends to `context_len` tokens (itself included): two per
    matmul weight, plus QK^T and PV (2 * heads * head_dim each per key). The usual MFU numerator;
    norms, rope and softmax are left out, as is customary."""
    attention = 4 * arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim * context_len
    return 2 * num_matmul_params(arch) + attention
