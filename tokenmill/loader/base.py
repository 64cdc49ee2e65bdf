"""What every loader returns: an architecture, weights under Hugging Face names, a tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenmill.models.arch_config import ArchConfig

if TYPE_CHECKING:
    from tokenmill.tokenizer.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """A model source opened but not yet materialised as a torch module.

    `iter_weights(dtype)` yields (hf_name, tensor) pairs already converted to `dtype`, one at a
    time, so peak memory stays near one tensor above the model's own size. Names follow Hugging
    Face's (`model.layers.0.self_attn.q_proj.weight`), with Q/K rows in Hugging Face order.
    """

    arch: ArchConfig
    iter_weights: Callable[[torch.dtype], Iterator[tuple[str, torch.Tensor]]]
    tokenizer: Tokenizer | None
    source: str  # path of the file or folder, or "dummy"
    format: str  # "gguf" | "hf" | "dummy"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The model's end-of-sequence ids: the architecture's, else the tokenizer's."""
        if self.arch.eos_token_ids:
            return tuple(self.arch.eos_token_ids)
        return tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None else ()
