"""Building an engine for a real model: open the checkpoint, settle the dtype, load the weights
into a ModelRunner, and hand that runner to a new LLMEngine, whose step-time predictor, when it
has a latency policy, first learns from a few real steps (engine/slo_calibrate.py). `LLM` and
`AsyncEngine.from_config` both build through here."""

from __future__ import annotations

import dataclasses
import logging

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.slo_calibrate import calibrate_predictor
from tokenmill.loader.base import LoadedModel
from tokenmill.loader.registry import open_model
from tokenmill.platform_info import cpu_computes_bf16
from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def build_engine(config: EngineConfig) -> LLMEngine:
    loaded = open_model(config.model)
    config = with_resolved_dtype(config, loaded)
    engine = LLMEngine(config, ModelRunner.load(loaded, config), loaded)
    calibrate_predictor(engine)
    return engine


def engine_sharing_weights(engine: LLMEngine, config: EngineConfig) -> LLMEngine:
    """A second engine over `engine`'s loaded weights, with its own runner and KV cache."""
    config = with_resolved_dtype(config, engine.loaded)
    shared = LLMEngine(config, engine.runner.sharing_weights(config), engine.loaded)
    calibrate_predictor(shared)
    return shared


def with_resolved_dtype(config: EngineConfig, loaded: LoadedModel | None) -> EngineConfig:
    """dtype "auto": bfloat16 where the CPU computes it natively, float32 on other CPUs, and on
    a GPU the checkpoint's own dtype (bfloat16 when it names none, as GGUF files do)."""
    if config.model.dtype != "auto":
        return config
    if config.model.device.startswith("cpu"):
        dtype = "bfloat16" if cpu_computes_bf16() else "float32"
    else:
        own = loaded.arch.torch_dtype if loaded is not None else None
        dtype = own if own in ("float32", "bfloat16", "float16") else "bfloat16"
    logger.info("dtype auto: %s on %s", dtype, config.model.device)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=dtype))
