"""Attention backends by name. Adding one is a new file plus one entry here."""

from __future__ import annotations

import importlib

from tokenmill.attention.backends.base import BaseAttentionBackend
from tokenmill.errors import ConfigError

_BACKENDS = {
    "torch": "tokenmill.attention.backends.torch_backend:TorchAttentionBackend",
    "triton": "tokenmill.attention.backends.triton_backend:TritonAttentionBackend",
}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str, device: str) -> BaseAttentionBackend:
    """`auto` picks Triton on CUDA devices when it imports, else the torch reference."""
    if name == "auto":
        name = "torch"
        if device.startswith("cuda"):
            try:
                return get_backend("triton", device)
            except (ImportError, ConfigError):
                pass
    if name not in _BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; known: {available_backends()}")
    module_name, cls_name = _BACKENDS[name].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, cls_name)()
