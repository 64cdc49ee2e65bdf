"""The draft model of "draft" and "self": which weights it computes on, its own runner and paged
KV cache, and the check that it speaks the target's tokens.

  draft   a smaller model at `spec.model` (a GGUF file or Hugging Face folder) sharing the
          target's tokenizer; quantization "auto" computes on it as shipped ("none")
  self    the target's own checkpoint loaded a second time with quantized weights: "auto" is
          the file's own blocks ("gguf") where it holds quantized ones and the native integer
          kernels run, else int4-g32. It shares the tokenizer and nothing else.

A self-draft of a target computing on floats copies the target's weights and quantizes the copy
(the checkpoint is not decoded twice). The draft's KV cache is a fraction of the target's memory and never caches prefixes: a draft
token must never be found as a known prefix.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.errors import ConfigError
from tokenmill.loader.base import LoadedModel
from tokenmill.loader.registry import open_model
from tokenmill.quant.apply import quantize_model
from tokenmill.quant.schemes import parse_quantization, resolve_quantization
from tokenmill.spec.config import SpeculativeConfig
from tokenmill.spec.draft_proposer import DraftModelProposer
from tokenmill.spec.target_kv import TargetKV
from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

DRAFT_KV_FRACTION = 0.25  # of the target's KV cache memory
SELF_FALLBACK_QUANTIZATION = "int4-g32"
# Texts both tokenizers must encode alike: words, code, digits, accents, CJK, an emoji.
TOKENIZER_PROBES = (
    "The quick brown fox jumps over the lazy dog. It's 2026, isn't it?",
    "def add(a: int, b: int) -> int:\n    return a + b  # 12345 + 67890",
    "Ünïcödé façade naïve — 日本語のテキスト 🙂",
)


def build_draft_proposer(
    spec: SpeculativeConfig,
    config: EngineConfig,
    runner: ModelRunner,
    loaded: LoadedModel,
) -> DraftModelProposer:
    """The proposer of a model-based method: its draft model loaded and warmed up."""
    if loaded is None:
        raise ConfigError(f'speculative method "{spec.method}" needs a real model')
    if spec.method == "self":
        draft_loaded = loaded
        quantization = self_draft_quantization(spec.quantization, loaded, config.model.device)
        model_config = config.model
    else:
        model_config = ModelConfig(
            model=spec.model, dtype=config.model.dtype, device=config.model.device,
            seed=config.model.seed,
        )  # fmt: skip
        draft_loaded = open_model(model_config)
        check_same_tokenizer(loaded, draft_loaded)
        quantization = "none" if spec.quantization == "auto" else spec.quantization
    draft_config = draft_engine_config(config, model_config, quantization)
    if spec.method == "self" and quantization == getattr(runner, "quantization", None):
        logger.warning(
            "the self-draft computes on the target's own weights (%s): every draft is "
            "accepted, and each costs what a target step does", quantization,
        )  # fmt: skip
    if spec.method == "self" and isinstance(runner, ModelRunner) and runner.quantization == "none":
        draft_runner = quantized_copy(runner, loaded, draft_config)
    else:
        draft_runner = ModelRunner.load(draft_loaded, draft_config)
    block_size = draft_config.cache.block_size
    kv = KVCacheManager(draft_runner.num_blocks, block_size, enable_prefix_caching=False)
    max_len = min(draft_loaded.arch.max_position_embeddings, kv.num_blocks * block_size)
    logger.info(
        "speculative %s: draft %s (%s weights), %d KV blocks",
        spec.method, draft_loaded.source, draft_runner.quantization, kv.num_blocks,
    )  # fmt: skip
    target_kv = None
    if spec.method == "self" and TargetKV.compatible(runner, draft_runner):
        target_kv = TargetKV(runner, draft_runner)
    proposer = DraftModelProposer(
        draft_runner, kv, max_len, config.scheduler.max_num_batched_tokens, target_kv
    )
    proposer.calibrate()
    return proposer


def quantized_copy(runner: ModelRunner, loaded: LoadedModel, config: EngineConfig) -> ModelRunner:
    """A runner over a copy of `runner`'s float weights, quantized per `config`: what
    ModelRunner.load would build, without decoding the checkpoint a second time."""
    start = time.perf_counter()
    model = copy.deepcopy(runner.model)
    scheme = parse_quantization(config.model.quantization)
    quantize_model(model, loaded, scheme)
    draft = ModelRunner(model, runner.backend, loaded.arch, config, loaded.eos_token_ids)
    draft.quantization = scheme.name
    draft.warm_up()
    logger.info("self-draft weights (%s) in %.1fs", scheme.name, time.perf_counter() - start)
    return draft


def self_draft_quantization(value: str, loaded: LoadedModel, device: str) -> str:
    """The scheme of a self-draft: "auto" is the GGUF's own blocks where they compute natively,
    else int4-g32."""
    if value != "auto":
        return value
    scheme = resolve_quantization("auto", loaded, device)
    return scheme.name if scheme.kind == "gguf" else SELF_FALLBACK_QUANTIZATION


def draft_engine_config(
    config: EngineConfig, model: ModelConfig, quantization: str
) -> EngineConfig:
    """The target's config with the draft's weights and a small KV cache without prefix
    caching; no speculation of its own, no step trace."""
    cache = dataclasses.replace(
        config.cache,
        kv_cache_memory_gib=config.cache.kv_cache_memory_gib * DRAFT_KV_FRACTION,
        enable_prefix_caching=False,
    )
    model = dataclasses.replace(model, quantization=quantization)
    return dataclasses.replace(
        config, model=model, cache=cache, speculative_config=None, record_step_trace=False
    )


def check_same_tokenizer(target: LoadedModel, draft: LoadedModel) -> None:
    """A ConfigError unless the draft model's token ids mean what the target's do."""
    vocab, draft_vocab = target.arch.vocab_size, draft.arch.vocab_size
    if vocab != draft_vocab:
        raise ConfigError(
            f"the draft model {draft.source} has a vocabulary of {draft_vocab} tokens and the "
            f"target {vocab}: a draft model must share the target's tokenizer"
        )
    if target.tokenizer is None or draft.tokenizer is None:
        logger.warning(
            "cannot compare the draft model's tokenizer with the target's (one has none); "
            "trusting the equal vocabulary size (%d)", vocab,
        )  # fmt: skip
        return
    for text in TOKENIZER_PROBES:
        ids, draft_ids = target.tokenizer.encode(text), draft.tokenizer.encode(text)
        if ids != draft_ids:
            raise ConfigError(
                f"the draft model {draft.source} does not share the target's tokenizer: "
                f"{text!r} is {draft_ids[:12]} for it and {ids[:12]} for the target"
            )
