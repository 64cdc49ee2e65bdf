"""What every loader returns: an architecture, weights under Hugging Face names, a tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGMLQuantizationType

from tokenmill.models.arch_config import ArchConfig

if TYPE_CHECKING:
    from tokenmill.tokenizer.tokenizer import Tokenizer


@dataclass(frozen=True)
class GGUFBlocks:
    """One tensor of a GGUF file as stored: raw bytes, GGML type, shape in torch order."""

    raw: np.ndarray
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]


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
    # GGUF only: (hf_name, tensor blocks) for every block-quantized tensor, rows still in the
    # file's order (tokenmill/quant/apply.py keeps them as the model's weights).
    iter_blocks: Callable[[], Iterator[tuple[str, GGUFBlocks]]] | None = None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The model's end-of-sequence ids: the architecture's, else the tokenizer's."""
        if self.arch.eos_token_ids:
            return tuple(self.arch.eos_token_ids)
        return tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None else ()
