"""Fit "this machine" to the engine's measured step trace.

Each step's FLOPs and bytes come from the same cost model the planner uses, operator by
operator, and the fit finds the profile that best reproduces the measured step times:

    wall_time = per_step + per_request * num_reqs + per_prefill * num_prompt_segments
                + sum over operators of combine(FLOPs / flop_rate, bytes / byte_rate)

(a prompt segment: a request whose prompt, or a chunk of it, runs in the step; on the CPU each
one's attention runs apart from the batched decode, a fixed cost per layer).

The matmuls and element-wise work share one FLOP rate, attention has its own (a CPU's attention
kernels reach a rate unlike its GEMMs'; the profile's attention_unit carries it), and all bytes
move at one bandwidth. `combine` is the sum (no overlap: a linear model, solved by non-negative
least squares) or the max (a roofline: the same solve over which side bounds each operator,
iterated until that stops changing). Both minimise the relative error, so small decode steps
weigh as much as large prefill steps; steps far off the first fit (another process took the CPU)
are dropped and the fit repeated.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from tokenmill.errors import ConfigError
from tokenmill.models.arch_config import ArchConfig
from tokenmill.perf.dtypes import Precision
from tokenmill.perf.step_cost import step_cost
from tokenmill.perf.trace import StepRecord

UNBOUNDED = 1e18  # a rate the fit found no cost for
_COLUMNS = ("per_step", "per_request", "flops", "attention_flops", "bytes", "per_prefill")


@dataclass(frozen=True)
class CalibrationFit:
    per_step_s: float
    per_request_s: float
    flops_per_s: float  # matmuls and element-wise operators
    bytes_per_s: float
    num_steps: int
    rel_rms_error: float  # of the fitted step times against the measured ones (steps kept)
    median_abs_rel_error: float
    attention_flops_per_s: float = UNBOUNDED
    overlap: bool = False  # max(compute, memory) per operator instead of their sum
    num_outliers: int = 0  # steps dropped as disturbed
    per_prefill_s: float = 0.0  # per prompt segment in the step

    @property
    def coefficients(self) -> np.ndarray:
        return np.array([
            self.per_step_s, self.per_request_s, _inverse(self.flops_per_s),
            _inverse(self.attention_flops_per_s), _inverse(self.bytes_per_s), self.per_prefill_s,
        ])  # fmt: skip

    def predict(self, features: StepFeatures) -> np.ndarray:
        return features.predict(self.coefficients, self.overlap)


def _inverse(rate: float) -> float:
    return 0.0 if rate >= UNBOUNDED else 1.0 / rate


@dataclass(frozen=True)
class StepFeatures:
    """Per step (N) and operator (K): FLOPs and bytes (times the layers it runs in)."""

    flops: np.ndarray  # (N, K)
    nbytes: np.ndarray  # (N, K)
    is_attention: np.ndarray  # (K,) bool
    num_reqs: np.ndarray  # (N,)
    wall: np.ndarray  # (N,)
    num_prefill: np.ndarray  # (N,) prompt segments

    @classmethod
    def of(cls, records: Sequence[StepRecord], arch: ArchConfig, precision: Precision):
        flops, nbytes, is_attention, num_prefill = [], [], None, []
        for rec in records:
            shape = rec.batch_shape()
            num_prefill.append(shape.num_prefill_reqs)
            cost = step_cost(arch, shape, precision)
            times = [cost.num_layers if op.per_layer else 1 for op in cost.ops]
            flops.append([op.flops * t for op, t in zip(cost.ops, times, strict=True)])
            nbytes.append([op.total_bytes * t for op, t in zip(cost.ops, times, strict=True)])
            is_attention = is_attention or [op.kind == "attention" for op in cost.ops]
        return cls(
            np.asarray(flops, dtype=float).reshape(len(records), -1),
            np.asarray(nbytes, dtype=float).reshape(len(records), -1),
            np.asarray(is_attention or [], dtype=bool),
            np.asarray([r.num_reqs for r in records], dtype=float),
            np.asarray([r.wall_time_s for r in records], dtype=float),
            np.asarray(num_prefill, dtype=float),
        )

    def subset(self, mask: np.ndarray) -> StepFeatures:
        return replace(
            self, flops=self.flops[mask], nbytes=self.nbytes[mask],
            num_reqs=self.num_reqs[mask], wall=self.wall[mask], num_prefill=self.num_prefill[mask],
        )  # fmt: skip

    def sides(self, coef: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rate = np.where(self.is_attention, coef[3], coef[2])  # (K,)
        return self.flops * rate, self.nbytes * coef[4]  # (N, K) each

    def predict(self, coef: np.ndarray, overlap: bool) -> np.ndarray:
        compute, memory = self.sides(coef)
        ops = np.maximum(compute, memory) if overlap else compute + memory
        return coef[0] + coef[1] * self.num_reqs + coef[5] * self.num_prefill + ops.sum(axis=1)

    def design(self, compute_bound: np.ndarray | None = None) -> np.ndarray:
        """Columns of _COLUMNS; with `compute_bound` (N, K), each operator's FLOPs count only
        where compute bounds it and its bytes only where memory does (the max model)."""
        if compute_bound is None:
            compute_bound = np.ones_like(self.flops, dtype=bool)
            memory_bound = compute_bound
        else:
            memory_bound = ~compute_bound
        flops = self.flops * compute_bound
        return np.stack([
            np.ones_like(self.wall), self.num_reqs, flops[:, ~self.is_attention].sum(axis=1),
            flops[:, self.is_attention].sum(axis=1), (self.nbytes * memory_bound).sum(axis=1),
            self.num_prefill,
        ], axis=1)  # fmt: skip


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients, by trying every active set (6 columns)."""
    best, best_err = np.zeros(a.shape[1]), float("inf")
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            coef, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(coef < 0):
                continue
            full = np.zeros(a.shape[1])
            full[list(cols)] = coef
            err = float(np.sum((a @ full - b) ** 2))
            if err < best_err:
                best, best_err = full, err
    return best


def _solve(feats: StepFeatures, compute_bound: np.ndarray | None) -> np.ndarray:
    a = feats.design(compute_bound)
    # Columns scaled to similar magnitudes so lstsq is well conditioned; rows by 1 / wall.
    scales = np.maximum(np.abs(a).max(axis=0), 1e-30)
    return _nnls(a / scales / feats.wall[:, None], np.ones_like(feats.wall)) / scales


def _rel_errors(feats: StepFeatures, coef: np.ndarray, overlap: bool) -> np.ndarray:
    return feats.predict(coef, overlap) / feats.wall - 1


def _fit_coefficients(feats: StepFeatures, overlap: bool) -> np.ndarray:
    coef = _solve(feats, None)
    if not overlap:
        return coef

    def objective(c: np.ndarray) -> float:
        return float(np.sum(_rel_errors(feats, c, True) ** 2))

    # The max model is piecewise linear: given which side bounds each operator it is the sum
    # model's solve. Iterate that from several guesses of the machine balance (FLOPs per byte
    # where operators turn compute-bound) and keep the best.
    best, best_err = coef, objective(coef)
    inv_flops = coef[2] or 1e-11
    for balance in np.logspace(-1, 3, 9):
        start = coef.copy()
        start[2], start[3], start[4] = inv_flops, coef[3] or inv_flops, inv_flops * balance
        c, pattern = start, None
        for _ in range(20):
            compute, memory = feats.sides(c)
            if pattern is not None and np.array_equal(compute >= memory, pattern):
                break
            pattern = compute >= memory
            c = _solve(feats, pattern)
            err = objective(c)
            if err < best_err:
                best, best_err = c, err
    return best


def _outliers(rel: np.ndarray) -> np.ndarray:
    """Steps whose relative error is far beyond the typical one (disturbed measurements)."""
    spread = 1.4826 * np.median(np.abs(rel - np.median(rel)))
    return np.abs(rel) > max(5 * spread, 0.15)


def fit_features(feats: StepFeatures, overlap: bool = False, trim: bool = True) -> CalibrationFit:
    if len(feats.wall) < 8:
        raise ConfigError(f"calibration needs at least 8 timed steps, got {len(feats.wall)}")
    coef = _fit_coefficients(feats, overlap)
    dropped = np.zeros(len(feats.wall), dtype=bool)
    if trim:
        dropped = _outliers(_rel_errors(feats, coef, overlap))
        if 0 < dropped.sum() <= len(feats.wall) // 4:
            coef = _fit_coefficients(feats.subset(~dropped), overlap)
        else:
            dropped[:] = False
    rel = _rel_errors(feats.subset(~dropped), coef, overlap)
    return CalibrationFit(
        per_step_s=float(coef[0]),
        per_request_s=float(coef[1]),
        flops_per_s=1.0 / coef[2] if coef[2] > 0 else UNBOUNDED,
        bytes_per_s=1.0 / coef[4] if coef[4] > 0 else UNBOUNDED,
        num_steps=int((~dropped).sum()),
        rel_rms_error=float(np.sqrt(np.mean(rel**2))),
        median_abs_rel_error=float(np.median(np.abs(rel))),
        attention_flops_per_s=1.0 / coef[3] if coef[3] > 0 else UNBOUNDED,
        overlap=overlap,
        num_outliers=int(dropped.sum()),
        per_prefill_s=float(coef[5]),
    )


def fit_trace(
    records: Sequence[StepRecord],
    arch: ArchConfig,
    precision: Precision | None = None,
    overlap: bool = False,
    trim: bool = True,
) -> CalibrationFit:
    """Fit step times of `records` (a model `arch` run at `precision`)."""
    records = [r for r in records if r.wall_time_s > 0 and r.num_reqs > 0]
    if len(records) < 8:
        raise ConfigError(f"calibration needs at least 8 timed steps, got {len(records)}")
    feats = StepFeatures.of(records, arch, precision or Precision(weights="fp32"))
    return fit_features(feats, overlap, trim)


@dataclass(frozen=True)
class ErrorSummary:
    """Relative errors of predicted step times: (predicted - measured) / measured."""

    num_steps: int
    median_abs: float
    p90_abs: float
    rms: float
    mean: float  # the bias: > 0 predicts slower than measured

    @classmethod
    def of(cls, rel: np.ndarray) -> ErrorSummary:
        if not len(rel):
            return cls(0, float("nan"), float("nan"), float("nan"), float("nan"))
        a = np.abs(rel)
        return cls(len(rel), float(np.median(a)), float(np.percentile(a, 90)),
                   float(np.sqrt(np.mean(rel**2))), float(np.mean(rel)))  # fmt: skip

    def describe(self) -> str:
        return (
            f"{self.num_steps} steps: median |err| {self.median_abs:.1%}, p90 {self.p90_abs:.1%},"
            f" RMS {self.rms:.1%}, bias {self.mean:+.1%}"
        )


def evaluate(
    fit: CalibrationFit, records: Sequence[StepRecord], arch: ArchConfig, precision: Precision
) -> dict[str, ErrorSummary]:
    """Errors of `fit` on `records`: all of them and per step kind (prefill, decode, mixed)."""
    feats = StepFeatures.of(records, arch, precision)
    rel = fit.predict(feats) / feats.wall - 1
    kinds = np.asarray([r.kind for r in records])
    out = {"all": ErrorSummary.of(rel)}
    for kind in ("prefill", "decode", "mixed"):
        out[kind] = ErrorSummary.of(rel[kinds == kind])
    return out
