"""What quant-eval measured, as plain dataclasses; `as_json` is the JSON file's content."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from tokenmill.quant_eval.memory import MemoryUse
from tokenmill.quant_eval.speed import SpeedResult


@dataclass
class TaskResult:
    task: str
    num_texts: int
    num_tokens: int  # scored (teacher-forced) tokens
    perplexity: float
    perplexity_change_pct: float  # vs the reference's perplexity on the same tokens
    mean_kl: float  # KL(reference || scheme) per token, nats
    p99_kl: float
    top1_agreement: float
    accuracy: float | None = None  # None: the task has no answers
    accuracy_name: str = ""
    num_answers: int = 0


@dataclass
class SchemeResult:
    scheme: str
    settings: dict[str, str]
    is_reference: bool = False
    error: str | None = None  # set when the scheme could not be built or measured
    # What the engine settled to: dtype, kv_cache_dtype, quantization.
    engine: dict[str, str] = field(default_factory=dict)
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    speed: SpeedResult | None = None
    memory: MemoryUse | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Tolerance:
    """Within tolerance of the reference: mean KL at most `max_kl` nats on the task and, where
    the task has answers, accuracy at most `max_accuracy_drop` below the reference's."""

    max_kl: float = 0.01
    max_accuracy_drop: float = 0.02

    def describe(self) -> str:
        return (
            f"mean KL <= {self.max_kl:g} nats/token, accuracy >= reference - "
            f"{self.max_accuracy_drop:g}"
        )

    def accepts(self, result: TaskResult, reference: TaskResult) -> bool:
        if not result.mean_kl <= self.max_kl:  # NaN is not accepted
            return False
        if result.accuracy is None or reference.accuracy is None:
            return True
        return result.accuracy >= reference.accuracy - self.max_accuracy_drop


@dataclass
class ModelResult:
    model: str  # the name asked for (smollm2, gemma3, or a path)
    source: str  # the file or folder loaded
    schemes: list[SchemeResult] = field(default_factory=list)  # the reference first

    @property
    def reference(self) -> SchemeResult:
        return next(s for s in self.schemes if s.is_reference)


def as_json(models: list[ModelResult], tolerance: Tolerance, settings: dict) -> dict:
    return _finite(
        {
            "settings": settings,
            "tolerance": asdict(tolerance),
            "models": [asdict(m) for m in models],
        }
    )


def _finite(value):
    """JSON has no NaN or inf: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
