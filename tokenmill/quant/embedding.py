"""An embedding table held quantized: a lookup dequantizes only the rows it needs. With tied
embeddings the same packed table is the output head's weight (`.weight`)."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.quant.packing import QuantizedWeight
from tokenmill.quant.reference import dequantize_rows


class QuantizedEmbedding(nn.Module):
    def __init__(self, weight: QuantizedWeight, like: nn.Embedding) -> None:
        super().__init__()
        self.weight = weight
        self.dtype = like.weight.dtype
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.weight, ids, self.dtype)
