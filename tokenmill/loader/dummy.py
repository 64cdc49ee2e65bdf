"""Random weights of any architecture, for benchmarks and tests that need no real model.

Names and shapes are those a Hugging Face Llama / Gemma 3 / Qwen checkpoint would have. Each
tensor is drawn from its own generator seeded by (seed, tensor index), so a weight does not
depend on which others were read. Linear and embedding weights have std 0.02 (transformers'
initializer range), norms sit at their identity value, so activations and logits stay finite.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tokenmill.loader.base import LoadedModel
from tokenmill.models.arch_config import ArchConfig
from tokenmill.tokenizer.tokenizer import Tokenizer

INIT_STD = 0.02
# Architectures whose RMSNorm computes x * (1 + w): identity is w = 0, not w = 1.
_ZERO_CENTERED_NORMS = ("gemma", "gemma2", "gemma3")
_QK_NORM = ("gemma3", "qwen3")
_SANDWICH_NORMS = ("gemma2", "gemma3")


def dummy_weight_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every weight a model of `arch` has."""
    h, d = arch.hidden_size, arch.head_dim
    q_out, kv_out = arch.num_attention_heads * d, arch.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h)}
    for i in range(arch.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q_out, h),
            p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.weight": (kv_out, h),
            p + "self_attn.o_proj.weight": (h, q_out),
            p + "mlp.gate_proj.weight": (arch.intermediate_size, h),
            p + "mlp.up_proj.weight": (arch.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, arch.intermediate_size),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if arch.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_out,),
                p + "self_attn.k_proj.bias": (kv_out,),
                p + "self_attn.v_proj.bias": (kv_out,),
            }
        if arch.mlp_bias:
            shapes |= {
                p + "mlp.gate_proj.bias": (arch.intermediate_size,),
                p + "mlp.up_proj.bias": (arch.intermediate_size,),
                p + "mlp.down_proj.bias": (h,),
            }
        if arch.architecture in _QK_NORM:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        if arch.architecture in _SANDWICH_NORMS:
            shapes |= {
                p + "pre_feedforward_layernorm.weight": (h,),
                p + "post_feedforward_layernorm.weight": (h,),
            }
    shapes["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


def open_dummy(arch: ArchConfig, seed: int = 0, tokenizer: Tokenizer | None = None) -> LoadedModel:
    """A LoadedModel of `arch` whose `iter_weights` draws deterministic random tensors."""
    shapes = dummy_weight_shapes(arch)
    norm_center = 0.0 if arch.architecture in _ZERO_CENTERED_NORMS else 1.0

    def iter_weights(dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        for idx, (name, shape) in enumerate(shapes.items()):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + idx)
            tensor = torch.randn(shape, generator=gen) * INIT_STD
            if "norm" in name:
                tensor += norm_center
            elif name.endswith(".bias"):
                tensor.zero_()
            yield name, tensor.to(dtype)

    return LoadedModel(
        arch=arch, iter_weights=iter_weights, tokenizer=tokenizer, source="dummy", format="dummy"
    )
