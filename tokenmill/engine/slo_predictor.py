"""The step-time predictor: how long a step of a given shape takes on this machine.

Its base is the perf model the planner uses (`perf.step_cost` and `perf.roofline` on this
machine's calibrated profile, the planner's "this-machine"); every measured step corrects it
online, per step kind, since prompt steps (compute-bound) and decode steps (bound by streaming
the weights) drift apart from the profile differently on a shared machine:

    predicted(batch) = base(batch) * ratio[kind(batch)]
    ratio[kind]     <- (1 - alpha) * ratio[kind] + alpha * measured / base     (after each step)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tokenmill.perf.dtypes import Precision
from tokenmill.perf.roofline import roofline_time
from tokenmill.perf.step_cost import BatchShape, RequestShape, step_cost

if TYPE_CHECKING:
    from tokenmill.models.arch_config import ArchConfig
    from tokenmill.perf.profile import HardwareProfile

logger = logging.getLogger(__name__)

STEP_KINDS = ("prompt", "decode", "verify")
_MIN_RATIO, _MAX_RATIO = 1e-3, 1e3


class BaseStepModel(Protocol):
    """The uncorrected time of one step of `batch`, in seconds."""

    def seconds(self, batch: BatchShape) -> float: ...


class RooflineStepModel:
    """The planner's physics: roofline time of the step's operators on a hardware profile."""

    def __init__(self, arch: ArchConfig, profile: HardwareProfile, precision: Precision) -> None:
        self.arch, self.profile, self.precision = arch, profile, precision

    def seconds(self, batch: BatchShape) -> float:
        return roofline_time(step_cost(self.arch, batch, self.precision), self.profile).seconds


class LinearStepModel:
    """`step_s` per step plus `token_s` per computed token: tests and what-if runs."""

    def __init__(self, step_s: float, token_s: float = 0.0) -> None:
        self.step_s, self.token_s = step_s, token_s

    def seconds(self, batch: BatchShape) -> float:
        return self.step_s + self.token_s * batch.num_tokens


def step_kind(batch: BatchShape) -> str:
    """prompt: any prompt tokens; verify: decodes with drafts (more logits rows than requests);
    decode: one token per request. Each drifts from the profile differently."""
    if batch.has_prompt_tokens:
        return "prompt"
    return "verify" if batch.num_logits > batch.num_reqs else "decode"


@dataclass
class PredictionStats:
    """Predicted against measured, per step kind: the sums and the last step's difference."""

    num_steps: int = 0
    predicted_s: float = 0.0
    measured_s: float = 0.0
    abs_error_s: float = 0.0  # sum of |predicted - measured|
    last_error_s: float = 0.0  # the last step's predicted - measured


class StepTimePredictor:
    def __init__(self, model: BaseStepModel, alpha: float = 0.2) -> None:
        self.model = model
        self.alpha = alpha
        self.ratio = dict.fromkeys(STEP_KINDS, 1.0)
        self.stats = {kind: PredictionStats() for kind in STEP_KINDS}

    @contextlib.contextmanager
    def uncorrected(self) -> Iterator[None]:
        """Predict from the base model alone inside the block (the corrections are kept)."""
        saved, self.ratio = self.ratio, dict.fromkeys(STEP_KINDS, 1.0)
        try:
            yield
        finally:
            self.ratio = saved

    def predict(self, batch: BatchShape) -> float:
        return self.model.seconds(batch) * self.ratio[step_kind(batch)]

    def predict_shapes(self, shapes: list[RequestShape]) -> float:
        return self.predict(BatchShape.from_requests(shapes)) if shapes else 0.0

    def observe(self, batch: BatchShape, measured_s: float) -> float:
        """Correct the model by one measured step; returns what was predicted for it."""
        kind = step_kind(batch)
        base = self.model.seconds(batch)
        predicted = base * self.ratio[kind]
        stats = self.stats[kind]
        if base > 0 and measured_s > 0:
            ratio = min(max(measured_s / base, _MIN_RATIO), _MAX_RATIO)
            # The first measurement replaces the profile's guess outright.
            weight = 1.0 if stats.num_steps == 0 else self.alpha
            self.ratio[kind] = (1 - weight) * self.ratio[kind] + weight * ratio
        stats.num_steps += 1
        stats.predicted_s += predicted
        stats.measured_s += measured_s
        stats.abs_error_s += abs(predicted - measured_s)
        stats.last_error_s = predicted - measured_s
        return predicted


def build_predictor(arch: ArchConfig | None, dtype: str) -> StepTimePredictor | None:
    """The predictor of a real model on this machine: the planner's "this-machine" profile (the
    calibrated one when `tokenmill plan calibrate` has run, else the bundled default)."""
    if arch is None:
        return None
    try:
        from tokenmill.plan.hardware import THIS_MACHINE, get_hardware

        profile = get_hardware(THIS_MACHINE).profile
        weights = {"float32": "fp32", "float16": "fp16"}.get(dtype, "bf16")
        return StepTimePredictor(RooflineStepModel(arch, profile, Precision(weights=weights)))
    except Exception:  # noqa: BLE001 - no prediction is no promise, never a failed server
        logger.exception("no step-time predictor: latency promises are off")
        return None
