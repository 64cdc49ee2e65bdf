"""Gemma 3 (text) on a flat token batch.

Differences from Llama: embeddings scaled by sqrt(E); RMSNorm scales by (1 + w); q/k RMSNorm per
head before rotary; four norms per layer (pre/post around attention and around the MLP);
GELU(tanh) MLP; scores scaled by query_pre_attn_scalar^-0.5; local layers attend within a
sliding window with their own rotary base, every `sliding_window_pattern`-th layer is global.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.attention.backends.base import AttentionSpec, BaseAttentionBackend
from tokenmill.attention.kv_smoothing import key_channel_scales
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
from tokenmill.models.linear_ops import compute_weight, linear, tied_head_weight, weight_rows


def is_sliding_layer(arch: ArchConfig, layer_idx: int) -> bool:
    layer_types = arch.extra.get("layer_types")
    if layer_types:
        return layer_types[layer_idx] == "sliding_attention"
    pattern = arch.sliding_window_pattern or 6
    return (layer_idx + 1) % pattern != 0


class Gemma3Attention(nn.Module):
    def __init__(self, arch: ArchConfig, layer_idx: int, backend: BaseAttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = arch.num_attention_heads, arch.num_key_value_heads
        self.head_dim = arch.head_dim
        self.is_sliding = is_sliding_layer(arch, layer_idx)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            arch.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=arch.attention_bias
        )
        self.o_proj = Linear(q_size, arch.hidden_size, bias=arch.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps, offset=1.0)
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps, offset=1.0)
        scalar = arch.query_pre_attn_scalar or self.head_dim
        spec = AttentionSpec(
            layer_idx, self.num_heads, self.num_kv_heads, self.head_dim, scalar**-0.5,
            sliding_window=arch.sliding_window if self.is_sliding else None,
        )  # fmt: skip
        self.attn = Attention(spec, backend)

    def smooth_keys(self) -> None:
        """For an int8 KV cache: K's channel sizes into q_norm's gain, out of k_norm's
        (attention/kv_smoothing.py); q . k is unchanged."""
        start, size = self.qkv_proj.shard_offsets["k"]
        k_rows = weight_rows(self.qkv_proj.weight, start, size)
        s = key_channel_scales(k_rows, self.num_kv_heads, self.head_dim, self.k_norm.gain())
        device = self.k_norm.weight.device
        self.q_norm.channel_scale = s.to(device)
        self.k_norm.channel_scale = (1.0 / s).to(device)

    def forward(self, x: torch.Tensor, rope: RopeTable):
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = self.q_norm(q.view(num_tokens, self.num_heads, self.head_dim))  # (T, H, D)
        k = self.k_norm(k.view(num_tokens, self.num_kv_heads, self.head_dim))  # (T, Hkv, D)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(rope, q, k)
        return self.o_proj(self.attn(q, k, v))


class Gemma3MLP(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        inter = arch.intermediate_size
        self.gate_up_proj = MergedLinear(arch.hidden_size, {"gate": inter, "up": inter})
        self.down_proj = Linear(inter, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, layer_idx: int, backend: BaseAttentionBackend) -> None:
        super().__init__()
        eps, size = arch.rms_norm_eps, arch.hidden_size
        self.self_attn = Gemma3Attention(arch, layer_idx, backend)
        self.mlp = Gemma3MLP(arch)
        self.input_layernorm = RMSNorm(size, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(size, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(size, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(size, eps, offset=1.0)

    def forward(self, x: torch.Tensor, rope: RopeTable):
        attn = self.self_attn(self.input_layernorm(x), rope)
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, arch: ArchConfig, backend: BaseAttentionBackend) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(arch, i, backend) for i in range(arch.num_hidden_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, offset=1.0)
        max_pos = arch.max_position_embeddings
        self.rotary_emb = RotaryEmbedding(
            arch.head_dim, max_pos, arch.rope_theta, arch.rope_scaling
        )
        self.rotary_emb_local = RotaryEmbedding(
            arch.head_dim, max_pos, arch.rope_local_base_freq or 10000.0, None
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, E)
        # The scale is rounded to the model dtype first, as the reference does.
        x = x * torch.tensor(self.arch.hidden_size**0.5, dtype=x.dtype)
        rope_global = self.rotary_emb(positions, x.dtype)
        rope_local = self.rotary_emb_local(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope_local if layer.self_attn.is_sliding else rope_global)
        return self.norm(x)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, arch: ArchConfig, backend: BaseAttentionBackend) -> None:
        super().__init__()
        self.arch = arch
        self.model = Gemma3Model(arch, backend)
        if not arch.tie_word_embeddings:
            self.lm_head = Linear(arch.hidden_size, arch.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Held once: a tied table's lookups read the head's panels (linear_ops.tied_head_weight).
        tied = self.arch.tie_word_embeddings
        head = tied_head_weight(self.model) if tied else compute_weight(self.lm_head)
        logits = linear(hidden, head).float()
        cap = self.arch.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits
