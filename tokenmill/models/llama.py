"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2-style biases) on a flat token batch.

Shapes: T = tokens scheduled this step (all requests, no padding), H = query heads,
Hkv = KV heads, D = head dim, E = hidden size. Per-step state comes from the forward context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.attention.backends.base import AttentionSpec, BaseAttentionBackend
from tokenmill.attention.layer import Attention
from tokenmill.models.arch_config import ArchConfig
from tokenmill.models.layers import (
    Linear,
    MergedLinear,
    RMSNorm,
    RopeTable,
    RotaryEmbedding,
    apply_rotary,
)
from tokenmill.models.linear_ops import compute_weight, linear, linear_argmax, tied_head_weight


class LlamaAttention(nn.Module):
    def __init__(self, arch: ArchConfig, layer_idx: int, backend: BaseAttentionBackend) -> None:
        super().__init__()
        self.num_heads = arch.num_attention_heads
        self.num_kv_heads = arch.num_key_value_heads
        self.head_dim = arch.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # Qwen2 biases q/k/v but not the output projection; Llama's flag covers all four.
        qkv_bias = arch.attention_bias or arch.architecture == "qwen2"
        self.qkv_proj = MergedLinear(
            arch.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=qkv_bias
        )
        self.o_proj = Linear(q_size, arch.hidden_size, bias=arch.attention_bias)
        spec = AttentionSpec(
            layer_idx, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5
        )
        self.attn = Attention(spec, backend)

    def forward(self, x: torch.Tensor, rope: RopeTable):
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # (T, H, D)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(rope, q, k)
        return self.o_proj(self.attn(q, k, v))  # (T, E)


class LlamaMLP(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        inter = arch.intermediate_size
        self.gate_up_proj = MergedLinear(
            arch.hidden_size, {"gate": inter, "up": inter}, bias=arch.mlp_bias
        )
        self.down_proj = Linear(inter, arch.hidden_size, bias=arch.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, layer_idx: int, backend: BaseAttentionBackend) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, layer_idx, backend)
        self.mlp = LlamaMLP(arch)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: RopeTable):
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, arch: ArchConfig, backend: BaseAttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(arch, i, backend) for i in range(arch.num_hidden_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, E)
        rope = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ArchConfig, backend: BaseAttentionBackend) -> None:
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, backend)
        if not arch.tie_word_embeddings:
            self.lm_head = Linear(arch.hidden_size, arch.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, E]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, E] -> logits [N, V] in the model's dtype (the sampler widens them when
        it has more to do than an argmax)."""
        return linear(hidden, self._head_weight())

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, E] -> each row's argmax of compute_logits [N] by a kernel that never
        writes the logits; None where none applies (take the argmax of compute_logits)."""
        return linear_argmax(hidden, self._head_weight())

    def _head_weight(self) -> torch.Tensor:
        # Held once: a tied table's lookups read the head's panels (linear_ops.tied_head_weight).
        if self.arch.tie_word_embeddings:
            return tied_head_weight(self.model)
        return compute_weight(self.lm_head)
