"""Architectures by name. Adding one is a new model file plus one entry here."""

from __future__ import annotations

import importlib

from torch import nn

from tokenmill.attention.backends.base import BaseAttentionBackend
from tokenmill.errors import UnsupportedModelError
from tokenmill.models.arch_config import ArchConfig

_ARCHITECTURES = {
    "llama": "tokenmill.models.llama:LlamaForCausalLM",
    "mistral": "tokenmill.models.llama:LlamaForCausalLM",
    "qwen2": "tokenmill.models.llama:LlamaForCausalLM",
    "gemma3": "tokenmill.models.gemma3:Gemma3ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def build_model(arch: ArchConfig, backend: BaseAttentionBackend) -> nn.Module:
    """An uninitialised model of `arch` (weights are loaded afterwards)."""
    if arch.architecture not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch.architecture!r} is not supported; "
            f"supported: {', '.join(supported_architectures())}"
        )
    module_name, cls_name = _ARCHITECTURES[arch.architecture].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(arch, backend)
