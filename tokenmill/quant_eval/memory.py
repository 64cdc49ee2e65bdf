"""What a built engine holds: bytes of its weights and of its KV cache per token.

Weights are counted as resident storage, each storage once: the model's parameters and persistent
buffers, what modules hold as plain attributes (tensors, or objects holding tensors, such as a
packed quantized weight), and tensors hung on those (the packed copies native GEMMs keep beside
a weight). Non-persistent buffers (rotary tables) are not weights. The KV cache is measured the same way over the runner's
`kv*` tensors, divided by the token slots it has, and also stated by tokenmill.perf's formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.errors import ConfigError
from tokenmill.perf.kv_memory import kv_bytes_per_token


@dataclass(frozen=True)
class MemoryUse:
    weight_bytes: int  # all resident weight storage (packed copies included)
    kv_bytes_per_token: float  # measured: the runner's KV tensors / token slots
    kv_bytes_per_token_formula: float | None  # tokenmill.perf.kv_memory for the KV dtype


def measure_memory(engine) -> MemoryUse:
    runner = engine.runner
    model = runner.model
    state = list(model.state_dict(keep_vars=True).values())
    # Public attributes only: a module's `_buffers` also holds the non-persistent ones.
    plain = [v for m in model.modules() for k, v in vars(m).items() if not k.startswith("_")]
    weight_bytes = _storage_bytes(_held(state + plain, depth=3))
    kv_tensors = [v for k, v in vars(runner).items() if k.startswith("kv")]
    slots = (runner.num_blocks + 1) * runner.block_size  # + the scratch block
    kv_measured = _storage_bytes(_flatten(kv_tensors)) / slots
    return MemoryUse(weight_bytes, kv_measured, _kv_formula(engine))


def _kv_formula(engine) -> float | None:
    cache = engine.config.cache
    kv_dtype = engine.config.model.dtype if cache.kv_cache_dtype == "auto" else cache.kv_cache_dtype
    try:
        return kv_bytes_per_token(engine.arch, kv_dtype)
    except ConfigError:
        return None


def _flatten(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, list | tuple):
            yield from _flatten(value)
        elif isinstance(value, dict):
            yield from _flatten(value.values())


def _held(values, depth: int):
    """Tensors in `values`, in their containers, and in the attributes of tensors and plain
    objects, `depth` levels down; modules are walked by the caller."""
    for value in values:
        if isinstance(value, torch.nn.Module) or depth < 0:
            continue
        if isinstance(value, torch.Tensor):
            yield value
            yield from _held(vars(value).values(), depth - 1)
        elif isinstance(value, list | tuple):
            yield from _held(value, depth - 1)
        elif isinstance(value, dict):
            yield from _held(value.values(), depth - 1)
        elif hasattr(value, "__dict__") and not callable(value):
            yield from _held(vars(value).values(), depth - 1)


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())
