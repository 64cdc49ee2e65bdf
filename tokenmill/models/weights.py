"""Copying checkpoint tensors (Hugging Face names) into a model's parameters."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.models.layers import MergedLinear

# (fused module, checkpoint module, shard name): q/k/v and gate/up load into one matmul each.
STACKED_PARAMS = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", "gate"),
    ("gate_up_proj", "up_proj", "up"),
)


def load_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    ignore: tuple[str, ...] = ("rotary_emb.inv_freq",),
) -> None:
    """Load every parameter of `model` from `weights`; a missing or misshapen one is an error."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    for name, tensor in weights:
        if any(name.endswith(s) for s in ignore):
            continue
        target, shard = _resolve(name, params)
        if target is None:
            if name == "lm_head.weight" and "lm_head.weight" not in params:
                continue  # tied: the embedding is the head
            raise ModelLoadError(f"checkpoint tensor {name!r} has no place in the model")
        param = params[target]
        with torch.no_grad():
            if shard is None:
                _check_shape(name, param.shape, tensor.shape)
                param.copy_(tensor)
            else:
                module = modules[target.rsplit(".", 1)[0]]
                assert isinstance(module, MergedLinear)
                offset, size = module.shard_offsets[shard]
                dest = param.narrow(0, offset, size)
                _check_shape(name, dest.shape, tensor.shape)
                dest.copy_(tensor)
        loaded.add(f"{target}:{shard}" if shard else target)
    _check_complete(model, params, loaded)


def _resolve(name: str, params: dict[str, nn.Parameter]) -> tuple[str | None, str | None]:
    if name in params:
        return name, None
    for fused, part, shard in STACKED_PARAMS:
        if f".{part}." in name:
            fused_name = name.replace(f".{part}.", f".{fused}.")
            if fused_name in params:
                return fused_name, shard
    return None, None


def _check_shape(name: str, want: torch.Size, got: torch.Size) -> None:
    if want != got:
        raise ModelLoadError(
            f"tensor {name!r} has shape {tuple(got)}, the model expects {tuple(want)}"
        )


def _check_complete(model: nn.Module, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
    modules = dict(model.named_modules())
    missing = []
    for name in params:
        module = modules.get(name.rsplit(".", 1)[0])
        if isinstance(module, MergedLinear):  # weight and bias load shard by shard
            missing += [f"{name}:{s}" for s in module.shard_offsets if f"{name}:{s}" not in loaded]
        elif name not in loaded:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint lacks {len(missing)} model tensors: {shown}")
