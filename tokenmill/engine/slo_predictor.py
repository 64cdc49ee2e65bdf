"""The step-time predictor: how long a step of a given shape takes on this machine.

Its base is the perf model the planner uses (`perf.step_cost` and `perf.roofline` on this
machine's calibrated profile, the planner's "this-machine"); every measured step corrects it
online, per step kind, since prompt steps (compute-bound) and decode steps (bound by streaming
the weights) drift apart from the profile differently on a shared machine:

    predicted(batch) = c0[kind] + c1[kind] * base(batch) + c2[kind] * tokens(batch)

fitted by least squares to the measured steps of that kind, each older step weighing (1 - alpha)
times less, and held near c = (0, 1, 0) (the base model is right) where the steps do not tell.
A ratio alone (c1) misses what the base model gets wrong in shape, not scale: under GGUF
weights on this CPU a step with any prompt tokens costs 15-45 ms more than its decodes alone,
and its cost follows the rows it computes more than the roofline (decode rows riding on the
weight stream) says; a one-token chunk beside a full decode batch was then predicted far under
its cost, and a prompt promised on it trickled in 1-2 tokens a step past its TTFT
(BENCHMARKS.md section 11).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from tokenmill.perf.dtypes import Precision
from tokenmill.perf.roofline import roofline_time
from tokenmill.perf.step_cost import BatchShape, RequestShape, step_cost

if TYPE_CHECKING:
    from tokenmill.models.arch_config import ArchConfig
    from tokenmill.perf.profile import HardwareProfile

logger = logging.getLogger(__name__)

STEP_KINDS = ("prompt", "decode", "verify")
_MIN_RATIO, _MAX_RATIO = 1e-3, 1e3
_RIDGE = 1e-6  # how firmly c is held at (0, 1, 0), relative to the steps' own features
_BOUNDS = ((0.0, np.inf), (_MIN_RATIO, _MAX_RATIO), (0.0, np.inf))  # of c0, c1, c2


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

    def add(self, predicted: float, measured: float) -> None:
        self.num_steps += 1
        self.predicted_s += predicted
        self.measured_s += measured
        self.abs_error_s += abs(predicted - measured)
        self.last_error_s = predicted - measured


class Correction:
    """c0 + c1 * base + c2 * tokens = measured, for one step kind: least squares over the
    measured steps, each weighing `decay` times the one after it, with a small ridge toward
    (0, 1, 0); c0 and c2 kept >= 0 and c1 within [_MIN_RATIO, _MAX_RATIO] (one out of range
    is held at its bound and the rest refitted)."""

    PRIOR = (0.0, 1.0, 0.0)

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.coef = np.array(self.PRIOR)
        self._xx = np.zeros((3, 3))  # decayed sums of x x^T and of x * measured
        self._xm = np.zeros(3)

    def apply(self, base: float, num_tokens: int) -> float:
        c0, c1, c2 = self.coef
        return float(c0 + c1 * base + c2 * num_tokens)

    def update(self, base: float, num_tokens: int, measured: float) -> None:
        x = np.array([1.0, base, float(num_tokens)])
        self._xx = self.decay * self._xx + np.outer(x, x)
        self._xm = self.decay * self._xm + x * measured
        self.coef = self._solve()

    def _solve(self) -> np.ndarray:
        """Least squares with c0, c2 >= 0 and c1 in [_MIN_RATIO, _MAX_RATIO]: a coefficient out
        of its range is held at its bound and the others refitted without it. (Clamping c1
        after the fit instead left c0 + c2 fitted beside a c1 it no longer had: a run of
        batch-1 decodes whose base model rose with their context while they did not gave c1 <
        0, and clamped, a prediction 9x what they measured.)"""
        # The ridge scales with each feature's own size, so it means the same in any unit.
        ridge = _RIDGE * np.maximum(np.diag(self._xx), 1e-12)
        prior = np.array(self.PRIOR)
        coef = prior.copy()
        active = [0, 1, 2]
        while active:
            idx = np.array(active)
            held = [i for i in range(3) if i not in active]
            rhs = self._xm[idx] + ridge[idx] * prior[idx]
            rhs -= self._xx[np.ix_(idx, held)] @ coef[held] if held else 0.0
            coef[idx] = np.linalg.solve(self._xx[np.ix_(idx, idx)] + np.diag(ridge[idx]), rhs)
            out = [i for i in active if not _BOUNDS[i][0] <= coef[i] <= _BOUNDS[i][1]]
            if not out:
                break
            i = out[0]
            coef[i] = min(max(coef[i], _BOUNDS[i][0]), _BOUNDS[i][1])
            active.remove(i)
        return coef


class StepTimePredictor:
    def __init__(self, model: BaseStepModel, alpha: float = 0.05) -> None:
        self.model = model
        self.alpha = alpha  # the newest step's weight: older ones fade by (1 - alpha) a step
        self.corrections = {kind: Correction(1 - alpha) for kind in STEP_KINDS}
        self.stats = {kind: PredictionStats() for kind in STEP_KINDS}

    @contextlib.contextmanager
    def uncorrected(self) -> Iterator[None]:
        """Predict from the base model alone inside the block (the corrections are kept)."""
        saved = self.corrections
        self.corrections = {kind: Correction(1 - self.alpha) for kind in STEP_KINDS}
        try:
            yield
        finally:
            self.corrections = saved

    def predict(self, batch: BatchShape) -> float:
        base = self.model.seconds(batch)
        return self.corrections[step_kind(batch)].apply(base, batch.num_tokens)

    def predict_shapes(self, shapes: list[RequestShape]) -> float:
        return self.predict(BatchShape.from_requests(shapes)) if shapes else 0.0

    def observe(self, batch: BatchShape, measured_s: float) -> float:
        """Correct the model by one measured step; returns what was predicted for it."""
        kind = step_kind(batch)
        base = self.model.seconds(batch)
        predicted = self.corrections[kind].apply(base, batch.num_tokens)
        if base > 0 and measured_s > 0:
            self.corrections[kind].update(base, batch.num_tokens, measured_s)
        self.stats[kind].add(predicted, measured_s)
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
