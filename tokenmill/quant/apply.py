"""Putting a quantization scheme into a loaded model: every Linear's float weight replaced by
its packed integer form (the float copy is freed), the embedding table likewise (rows are
dequantized on lookup), so each weight is held once."""

from __future__ import annotations

import logging

import torch
from torch import nn

from tokenmill.loader.base import LoadedModel
from tokenmill.models.layers import Linear, MergedLinear
from tokenmill.models.linear_ops import PackedEmbedding, float_weight
from tokenmill.quant.embedding import QuantizedEmbedding
from tokenmill.quant.packing import QuantizedWeight, QuantTensor, pack
from tokenmill.quant.quantize import quantize_int4, quantize_int8
from tokenmill.quant.schemes import QuantScheme

logger = logging.getLogger(__name__)

_EMBEDDING = "model.embed_tokens"


def quantize_model(model: nn.Module, loaded: LoadedModel, scheme: QuantScheme) -> dict[str, int]:
    """Replace `model`'s weights per `scheme` (not none or auto); returns how many weights
    each packed format holds, e.g. {"int4-g32": 210, "int8-sym-g32": 1}."""
    source = _gguf_source(loaded) if scheme.kind == "gguf" else _float_source(scheme)
    counts: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear):
            packed = source(name, module, _checkpoint_names(name, module))
        elif isinstance(module, nn.Embedding | PackedEmbedding) and name == _EMBEDDING:
            packed = source(name, module, [f"{name}.weight"])
        else:
            continue
        if packed is None:
            continue
        packed.act_bits = scheme.act_bits
        _install(model, name, module, packed)
        counts[packed.describe()] = counts.get(packed.describe(), 0) + 1
    logger.info("quantization %s: %s", scheme.name, counts)
    return counts


def _checkpoint_names(name: str, module: Linear) -> list[str]:
    if not isinstance(module, MergedLinear):
        return [f"{name}.weight"]
    from tokenmill.models.weights import STACKED_PARAMS

    parent, fused = name.rsplit(".", 1)
    parts = {shard: part for f, part, shard in STACKED_PARAMS if f == fused}
    return [f"{parent}.{parts[shard]}.weight" for shard in module.shard_offsets]


def _install(model: nn.Module, name: str, module: nn.Module, packed: QuantizedWeight) -> None:
    if name == _EMBEDDING:
        parent_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, QuantizedEmbedding(packed, module))
        return
    del module.weight  # the float parameter goes; the packed form is the weight now
    module.weight = packed


def _float_source(scheme: QuantScheme):
    def quantize(name: str, module: nn.Module, _names: list[str]) -> QuantizedWeight:
        w = float_weight(module.weight)
        is_table = name in (_EMBEDDING, "lm_head")
        if scheme.kind == "int8" or is_table:
            return pack(quantize_int8(w, None if is_table else scheme.group))
        return pack(quantize_int4(w, scheme.group, scheme.symmetric))

    return quantize


def _gguf_source(loaded: LoadedModel):
    from tokenmill.loader.gguf_loader import to_hf_rows
    from tokenmill.quant.gguf_blocks import gguf_quant_tensor

    if loaded.iter_blocks is None:
        from tokenmill.errors import ConfigError

        raise ConfigError(f"quantization='gguf' needs a GGUF model, not a {loaded.format} one")
    blocks = dict(loaded.iter_blocks())

    def from_blocks(_name: str, _module: nn.Module, names: list[str]) -> QuantizedWeight | None:
        if not all(n in blocks for n in names):
            return None  # float in the file: stays float
        parts = []
        for n in names:
            b = blocks[n]
            t = gguf_quant_tensor(b.raw, b.ggml_type, b.shape)
            q, scale = to_hf_rows(t.q, n, loaded.arch), to_hf_rows(t.scale, n, loaded.arch)
            mins = None if t.min is None else to_hf_rows(t.min, n, loaded.arch)
            parts.append(QuantTensor(q, scale, mins, t.bits, t.group))
        return pack(merge_rows(parts))

    return from_blocks


def merge_rows(parts: list[QuantTensor]) -> QuantTensor:
    """Shards stacked by rows (q/k/v, gate/up) as one QuantTensor: 4-bit shards widen to
    8-bit and symmetric ones gain zero mins where the others need them (both exact); shards
    with different groups are requantized as int8 per 32 from their values."""
    if len(parts) == 1:
        return parts[0]
    if len({p.group for p in parts}) > 1:
        return quantize_int8(torch.cat([p.dequantize() for p in parts]), group=32)
    bits = max(p.bits for p in parts)
    with_min = any(p.min is not None for p in parts)
    mins = [p.min if p.min is not None else torch.zeros_like(p.scale) for p in parts]
    return QuantTensor(
        torch.cat([p.q for p in parts]),
        torch.cat([p.scale for p in parts]),
        torch.cat(mins) if with_min else None,
        bits,
        parts[0].group,
    )
