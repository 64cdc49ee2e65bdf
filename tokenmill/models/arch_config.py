"""The architecture description of a model, in Hugging Face config.json vocabulary.

Loaders (GGUF metadata, config.json, a dummy config) all produce this one frozen object; model
files read nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from tokenmill.errors import ConfigError


@dataclass(frozen=True)
class ArchConfig:
    architecture: str  # registry key, e.g. "llama", "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Hugging Face rope_scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma 3 and other families: sliding windows, softcaps, local rope, query scaling.
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None
    rope_local_base_freq: float | None = None
    query_pre_attn_scalar: float | None = None
    # The checkpoint's own dtype ("bfloat16", ...) when it says so (config.json); None for GGUF.
    torch_dtype: str | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], architecture: str | None = None) -> ArchConfig:
        """Build from a Hugging Face config.json dict (Llama family keys; others go to `extra`)."""
        cfg = normalize_hf_config(cfg)
        arch = architecture or _architecture_key(cfg)
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {
            "architecture": arch,
            "vocab_size": cfg["vocab_size"],
            "hidden_size": cfg["hidden_size"],
            "intermediate_size": cfg["intermediate_size"],
            "num_hidden_layers": cfg["num_hidden_layers"],
            "num_attention_heads": heads,
            "num_key_value_heads": cfg.get("num_key_value_heads") or heads,
            "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
            "max_position_embeddings": cfg.get("max_position_embeddings", 2048),
            "eos_token_ids": eos_ids,
            "torch_dtype": cfg.get("torch_dtype") or cfg.get("dtype"),
        }
        for key in known - kwargs.keys() - {"extra"}:
            if cfg.get(key) is not None:
                kwargs[key] = cfg[key]
        kwargs["extra"] = {k: v for k, v in cfg.items() if k not in known}
        return cls(**kwargs)


def _architecture_key(cfg: dict[str, Any]) -> str:
    model_type = cfg.get("model_type")
    if model_type:
        return {"gemma3_text": "gemma3"}.get(model_type, model_type)
    archs = cfg.get("architectures") or []
    if archs:
        return archs[0].removesuffix("ForCausalLM").lower()
    raise ConfigError("config.json names neither model_type nor architectures")


def normalize_hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Bring config.json spellings of several transformers versions to one vocabulary.

    transformers 5 writes `rope_parameters` (per layer type for Gemma 3) instead of
    `rope_theta`/`rope_scaling`/`rope_local_base_freq`, `layer_types` instead of
    `sliding_window_pattern`, and Gemma names its activation `hidden_activation`.
    """
    cfg = dict(cfg)
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    if cfg.get("hidden_activation") and "hidden_act" not in cfg:
        cfg["hidden_act"] = cfg["hidden_activation"]
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and ("full_attention" in rope or "sliding_attention" in rope):
        _apply_rope_parameters(cfg, rope.get("full_attention") or {})
        local_theta = (rope.get("sliding_attention") or {}).get("rope_theta")
        if local_theta is not None:
            cfg.setdefault("rope_local_base_freq", local_theta)
    elif isinstance(rope, dict):
        _apply_rope_parameters(cfg, rope)
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        scaling = dict(scaling)
        if "rope_type" not in scaling and "type" in scaling:
            scaling["rope_type"] = scaling.pop("type")
        cfg["rope_scaling"] = None if scaling.get("rope_type") in (None, "default") else scaling
    layer_types = cfg.get("layer_types")
    if layer_types and "sliding_attention" in layer_types and "full_attention" in layer_types:
        cfg.setdefault("sliding_window_pattern", layer_types.index("full_attention") + 1)
    return cfg


def _apply_rope_parameters(cfg: dict[str, Any], params: dict[str, Any]) -> None:
    if params.get("rope_theta") is not None:
        cfg.setdefault("rope_theta", params["rope_theta"])
    if params.get("rope_type", "default") != "default" and not cfg.get("rope_scaling"):
        cfg["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
