"""Open a GGUF file as a LoadedModel: metadata -> ArchConfig, tensors -> Hugging Face names.

Two conversions undo what llama.cpp's converter did, so the weights equal the Hugging Face
checkpoint's (the tests compare with transformers' own GGUF loader):

- llama: the rows of Q and K are permuted per head from rotate-half order (HF) to interleaved
  pairs (llama.cpp's rope). Within a head of `d` rows, HF row `h*(d/2) + i` (half h, pair i) is
  GGUF row `2*i + h`; `_unpermute_rows` reverses it.
- gemma3: every RMSNorm weight was stored as `1 + w` because ggml's norm multiplies by the
  weight while Gemma's computes `x * (1 + w)`; we subtract the 1 again.

Gemma 3 needs values that its GGUF does not store; llama.cpp hard-codes them and so do we:
sliding-window pattern 6 (five local layers, then a global one), local rope base 10000, and a
query scale of 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import torch

from tokenmill.errors import UnsupportedModelError
from tokenmill.loader.base import GGUFBlocks, LoadedModel
from tokenmill.loader.gguf_dequant import FLOAT_TYPES, check_supported, dequantize
from tokenmill.loader.gguf_file import GGUFFile
from tokenmill.models.arch_config import ArchConfig
from tokenmill.tokenizer.gguf_vocab import gguf_eos_token_ids
from tokenmill.tokenizer.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 has four norms per layer; llama.cpp's "ffn_norm" is its pre-feedforward norm.
_GEMMA3_LAYER_NAMES = _LAYER_NAMES | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors that carry configuration, not weights (llama 3's precomputed rope frequency factors).
_CONFIG_TENSORS = {"rope_freqs.weight"}

GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_ROPE_LOCAL_BASE_FREQ = 10000.0


def gguf_to_hf_name(name: str, architecture: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None if the name is not one we know."""
    stem, _, suffix = name.rpartition(".")
    if stem in _TOP_LEVEL_NAMES and suffix in ("weight", "bias"):
        return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    match = _LAYER_RE.fullmatch(name)
    if match is None:
        return None
    layer, part, suffix = match.groups()
    names = _GEMMA3_LAYER_NAMES if architecture == "gemma3" else _LAYER_NAMES
    if part not in names:
        return None
    return f"model.layers.{layer}.{names[part]}.{suffix}"


def open_gguf(path: str, with_tokenizer: bool = True) -> LoadedModel:
    """Open `path` (memory-mapped); weights are decoded lazily by `iter_weights(dtype)`."""
    gguf = GGUFFile(path)
    try:
        arch = gguf_arch_config(gguf)
        hf_names = _hf_names(gguf, arch.architecture)
    except Exception:
        gguf.close()
        raise

    def iter_weights(dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        for gguf_name, hf_name in hf_names.items():
            info = gguf.tensors[gguf_name]
            tensor = _to_hf_convention(
                dequantize(gguf.raw(info), info.ggml_type, info.shape), hf_name, arch
            )
            yield hf_name, tensor.to(dtype)

    def iter_blocks() -> Iterator[tuple[str, GGUFBlocks]]:
        for gguf_name, hf_name in hf_names.items():
            info = gguf.tensors[gguf_name]
            if info.ggml_type not in FLOAT_TYPES and len(info.shape) == 2:
                yield hf_name, GGUFBlocks(gguf.raw(info), info.ggml_type, tuple(info.shape))

    tokenizer = None
    if with_tokenizer and "tokenizer.ggml.tokens" in gguf.metadata:
        tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    return LoadedModel(
        arch=arch, iter_weights=iter_weights, tokenizer=tokenizer, source=path, format="gguf",
        iter_blocks=iter_blocks,
    )  # fmt: skip


def _hf_names(gguf: GGUFFile, architecture: str) -> dict[str, str]:
    hf_names = {}
    for info in gguf.tensors.values():
        check_supported(info.ggml_type, info.name)
        if info.name in _CONFIG_TENSORS:
            continue
        hf_name = gguf_to_hf_name(info.name, architecture)
        if hf_name is None:
            raise UnsupportedModelError(
                f"{gguf.path}: tensor {info.name} has no Hugging Face name for a "
                f"{architecture} model"
            )
        hf_names[info.name] = hf_name
    return hf_names


def _to_hf_convention(tensor: torch.Tensor, hf_name: str, arch: ArchConfig) -> torch.Tensor:
    if arch.architecture == "gemma3" and hf_name.endswith("norm.weight"):
        return tensor.float() - 1.0
    return to_hf_rows(tensor, hf_name, arch)


def to_hf_rows(tensor: torch.Tensor, hf_name: str, arch: ArchConfig) -> torch.Tensor:
    """A tensor whose first dimension is the weight's rows, in Hugging Face's row order (llama's
    Q and K rows are permuted per head in GGUF files; every other tensor is as stored)."""
    if arch.architecture == "llama":
        if ".self_attn.q_proj." in hf_name:
            return _unpermute_rows(tensor, arch.num_attention_heads)
        if ".self_attn.k_proj." in hf_name:
            return _unpermute_rows(tensor, arch.num_key_value_heads)
    return tensor


def _unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    rows = w.shape[0]
    # GGUF rows per head are (pair i, half h); HF's are (half h, pair i).
    per_head = w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])  # (nh, d/2, 2, ...)
    return per_head.transpose(1, 2).reshape(w.shape).contiguous()  # (nh*d, ...)


def gguf_arch_config(gguf: GGUFFile) -> ArchConfig:
    """The architecture a GGUF describes, in Hugging Face config vocabulary."""
    arch = gguf.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gguf.path}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def key(name: str, default: Any = None) -> Any:
        return gguf.get(f"{arch}.{name}", default)

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    tokens = gguf.get("tokenizer.ggml.tokens")
    vocab_size = key("vocab_size") or (len(tokens) if tokens else None)
    if vocab_size is None:
        vocab_size = gguf.tensors["token_embd.weight"].shape[0]
    fields: dict[str, Any] = {
        "architecture": arch,
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(gguf, arch),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": "blk.0.attn_q.bias" in gguf.tensors,
        "bos_token_id": gguf.get("tokenizer.ggml.bos_token_id"),
        "eos_token_ids": gguf_eos_token_ids(gguf.metadata),
        "extra": {"general.name": gguf.get("general.name")},
    }
    if arch == "gemma3":
        fields.update(_gemma3_fields(gguf, hidden, heads, head_dim))
    return ArchConfig(**fields)


def _gemma3_fields(gguf: GGUFFile, hidden: int, heads: int, head_dim: int) -> dict[str, Any]:
    num_layers = int(gguf.get("gemma3.block_count"))
    return {
        "hidden_act": "gelu_pytorch_tanh",
        "sliding_window": gguf.get("gemma3.attention.sliding_window"),
        "sliding_window_pattern": int(
            gguf.get("gemma3.attention.sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN)
        ),
        "rope_local_base_freq": float(
            gguf.get("gemma3.rope.freq_base_swa", GEMMA3_ROPE_LOCAL_BASE_FREQ)
        ),
        "query_pre_attn_scalar": float(hidden // heads if num_layers == 62 else head_dim),
        "final_logit_softcapping": gguf.get("gemma3.final_logit_softcapping"),
        "attn_logit_softcapping": gguf.get("gemma3.attn_logit_softcapping"),
    }


def _rope_scaling(gguf: GGUFFile, arch: str) -> dict[str, Any] | None:
    kind = gguf.get(f"{arch}.rope.scaling.type")
    factor = gguf.get(f"{arch}.rope.scaling.factor")
    original = gguf.get(f"{arch}.rope.scaling.original_context_length")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor:
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if kind not in (None, "none"):
        raise UnsupportedModelError(f"{gguf.path}: rope scaling type {kind!r} is not supported")
    info = gguf.tensors.get("rope_freqs.weight")
    if info is not None:
        freq_factors = dequantize(gguf.raw(info), info.ggml_type, info.shape).float()
        return llama3_rope_scaling(freq_factors, float(gguf.get(f"{arch}.rope.freq_base", 1e4)))
    return None


# Llama 3.1/3.2 store no rope-scaling metadata, only the per-frequency divisors llama.cpp's
# converter computed from these parameters; `factor` is the largest divisor.
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0
LLAMA3_ORIGINAL_CONTEXT = 8192


def llama3_rope_factors(head_dim: int, base: float, scaling: dict[str, Any]) -> torch.Tensor:
    """The per-frequency divisors llama 3 rope scaling applies (what `rope_freqs` stores)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    original = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (original / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / scaling["factor"] + smooth)
    factors = torch.where(wavelen < original / high, 1.0, mid)
    return torch.where(wavelen > original / low, scaling["factor"], factors)


def llama3_rope_scaling(freq_factors: torch.Tensor, base: float) -> dict[str, Any]:
    scaling = {
        "rope_type": "llama3",
        "factor": float(freq_factors.max()),
        "low_freq_factor": LLAMA3_LOW_FREQ_FACTOR,
        "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
        "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT,
    }
    expected = llama3_rope_factors(freq_factors.numel() * 2, base, scaling)
    if not torch.allclose(expected.float(), freq_factors, rtol=1e-3):
        raise UnsupportedModelError(
            "rope_freqs in this GGUF do not match llama 3 rope scaling with the standard "
            f"parameters {scaling}"
        )
    return scaling
