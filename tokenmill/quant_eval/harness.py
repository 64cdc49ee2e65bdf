"""quant-eval of one model: the reference (float32, no quantization), then every scheme against it.

    per scheme:  engine (teacher forcing: one text at a time, chunked prefill, no prefix cache)
                   -> every task's texts: scheme logits vs reference logits -> TokenStats
                 + an engine over the same weights (batched serving, step trace)
                   -> greedy answers of tasks that have them -> accuracy
                   -> prefill / decode speed
                 + weight and KV bytes

A scheme that cannot be built (an option this tokenmill lacks, a value it refuses) or fails while
measured gets `error` in its result and the run goes on with the next.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.build import build_engine, engine_sharing_weights
from tokenmill.errors import ConfigError
from tokenmill.llm import LLM
from tokenmill.loader.registry import open_model
from tokenmill.quant_eval.memory import measure_memory
from tokenmill.quant_eval.metrics import TokenStats
from tokenmill.quant_eval.reference import ReferenceLogits
from tokenmill.quant_eval.results import ModelResult, SchemeResult, TaskResult
from tokenmill.quant_eval.schemes import REFERENCE, Scheme, SchemeUnsupported, apply_scheme
from tokenmill.quant_eval.speed import SpeedSettings, measure_speed, serving_config
from tokenmill.quant_eval.tasks import Task, TaskSize, build_task
from tokenmill.quant_eval.teacher_forcing import TeacherForcer, teacher_forcing_config
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    tasks: tuple[str, ...] = ("chat", "code", "math")
    size: TaskSize = field(default_factory=lambda: TaskSize(num_samples=50, max_tokens=256))
    chunk_tokens: int = 64  # prefill chunk of teacher forcing: later chunks read the KV cache
    speed: SpeedSettings | None = field(default_factory=SpeedSettings)  # None: not timed
    device: str = "cpu"
    load_format: str = "auto"
    reference_cache_gib: float = 2.0
    progress: bool = True


def evaluate_model(
    model: str | None, schemes: Sequence[Scheme], settings: EvalSettings, name: str = ""
) -> ModelResult:
    base = EngineConfig(
        model=ModelConfig(model=model, load_format=settings.load_format, device=settings.device)
    )
    loaded = open_model(base.model)  # the tokenizer and shapes; each engine reads the weights
    limit = loaded.arch.max_position_embeddings - 1
    tasks = [_fit(build_task(t, loaded.tokenizer, settings.size), limit) for t in settings.tasks]
    result = ModelResult(name or model or "smollm2", loaded.source)
    ref_config = apply_scheme(base, REFERENCE)
    ref_engine = build_engine(_tf_config(ref_config, tasks, settings))
    budget = int(settings.reference_cache_gib * 2**30)
    reference = ReferenceLogits(TeacherForcer(ref_engine), budget)
    ref_result = SchemeResult(REFERENCE.name, REFERENCE.settings_dict, is_reference=True)
    start = time.perf_counter()
    _measure(ref_result, ref_engine, ref_config, tasks, reference, settings)
    ref_result.seconds = time.perf_counter() - start
    result.schemes.append(ref_result)
    for scheme in tqdm(schemes, desc=f"{result.model} schemes", disable=not settings.progress):
        result.schemes.append(_evaluate_scheme(scheme, base, tasks, reference, settings))
        gc.collect()
    _fill_perplexity_changes(result)
    return result


def _evaluate_scheme(scheme, base, tasks, reference, settings) -> SchemeResult:
    result = SchemeResult(scheme.name, scheme.settings_dict)
    start = time.perf_counter()
    try:
        config = apply_scheme(base, scheme)
        engine = build_engine(_tf_config(config, tasks, settings))
        _measure(result, engine, config, tasks, reference, settings)
    except SchemeUnsupported as exc:
        result.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - one scheme's failure must not end the run
        logger.exception("quant-eval: scheme %s failed", scheme.name)
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    if result.error:
        logger.warning("quant-eval: scheme %s: %s", scheme.name, result.error)
    return result


def _measure(result, engine, config, tasks, reference, settings) -> None:
    """Everything about one built engine into `result`; the reference compares with itself."""
    result.engine = _settled(engine)
    stats = {t.name: _quality(t, engine, reference, result, settings.progress) for t in tasks}
    serving = None
    if settings.speed is not None or any(t.answer_items for t in tasks):
        speed = settings.speed or SpeedSettings()
        max_context = max(t.max_context_len for t in tasks)
        serving = engine_sharing_weights(engine, serving_config(config, speed, max_context))
    for task in tasks:
        accuracy = _accuracy(task, serving, settings.progress) if task.answer_items else None
        result.tasks[task.name] = _task_result(task, stats[task.name], accuracy)
    if settings.speed is not None:
        result.speed = measure_speed(serving, settings.speed)
    result.memory = measure_memory(engine)


def _quality(task: Task, engine, reference: ReferenceLogits, result, progress) -> TokenStats:
    forcer = None if result.is_reference else TeacherForcer(engine)
    stats = TokenStats()
    items = task.teacher_items
    label = f"{result.scheme} {task.name}"
    for i, item in enumerate(tqdm(items, desc=label, leave=False, disable=not progress)):
        logits = forcer.logits(item) if forcer is not None else None
        ref = reference.get(task.name, i, item)
        stats.add(ref, ref if logits is None else logits, torch.tensor(item.target_ids))
    return stats


def _accuracy(task: Task, engine, progress: bool) -> float:
    items = task.answer_items
    params = [SamplingParams(max_tokens=a.max_tokens, temperature=0, stop=a.stop) for a in items]
    outputs = LLM.from_engine(engine).generate(
        [a.prompt_ids for a in items], params, use_tqdm=progress
    )
    texts = [o.outputs[0].text for o in outputs]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        passed = list(pool.map(lambda a, text: a.check(text), items, texts))
    return sum(passed) / len(passed)


def _task_result(task: Task, stats: TokenStats, accuracy: float | None) -> TaskResult:
    return TaskResult(
        task=task.name, num_texts=len(task.teacher_items), num_tokens=stats.num_tokens,
        perplexity=stats.perplexity, perplexity_change_pct=float("nan"), mean_kl=stats.mean_kl,
        p99_kl=stats.kl_quantile(0.99), top1_agreement=stats.top1_agreement, accuracy=accuracy,
        accuracy_name=task.accuracy_name, num_answers=len(task.answer_items),
    )  # fmt: skip


def _fill_perplexity_changes(result: ModelResult) -> None:
    ref = result.reference.tasks
    for scheme in result.schemes:
        for name, task in scheme.tasks.items():
            task.perplexity_change_pct = 100.0 * (task.perplexity / ref[name].perplexity - 1.0)


def _settled(engine) -> dict[str, str]:
    model, cache = engine.config.model, engine.config.cache
    kv = model.dtype if cache.kv_cache_dtype == "auto" else cache.kv_cache_dtype
    # The runner knows what "auto" chose; the config what was asked.
    quantization = getattr(engine.runner, "quantization", getattr(model, "quantization", "none"))
    return {"dtype": model.dtype, "kv_cache_dtype": kv, "quantization": str(quantization)}


def _tf_config(config: EngineConfig, tasks: list[Task], settings: EvalSettings) -> EngineConfig:
    longest = max(i.num_tokens for t in tasks for i in t.teacher_items)
    return teacher_forcing_config(config, settings.chunk_tokens, longest)


def _fit(task: Task, limit: int) -> Task:
    """Drop texts and questions longer than the model's context."""
    teacher = [i for i in task.teacher_items if i.num_tokens < limit]
    answers = [a for a in task.answer_items if len(a.prompt_ids) + a.max_tokens < limit]
    dropped = len(task.teacher_items) - len(teacher) + len(task.answer_items) - len(answers)
    if dropped:
        logger.warning(
            "quant-eval %s: %d items longer than the context dropped", task.name, dropped
        )
    if not teacher:
        raise ConfigError(f"task {task.name}: no text fits the model's context of {limit} tokens")
    return Task(task.name, teacher, answers, task.accuracy_name)
