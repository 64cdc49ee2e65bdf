"""Fit "this machine" to the engine's measured step trace.

Each step's FLOPs and bytes come from the same cost model the planner uses; the fit finds

    wall_time = per_step + per_request * num_reqs + FLOPs / flop_rate + bytes / byte_rate

by non-negative least squares on relative error (small decode steps weigh as much as large
prefill steps). The additive form is what a CPU does: it overlaps little memory with compute.
The fitted profile is written in the catalogue's schema, each figure's source naming the fit.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenmill.errors import ConfigError
from tokenmill.models.arch_config import ArchConfig
from tokenmill.perf.dtypes import Precision
from tokenmill.perf.step_cost import step_cost
from tokenmill.perf.trace import StepRecord
from tokenmill.plan.hardware import THIS_MACHINE, calibrated_path

_UNBOUNDED = 1e18  # a rate the fit found no cost for


@dataclass(frozen=True)
class CalibrationFit:
    per_step_s: float
    per_request_s: float
    flops_per_s: float
    bytes_per_s: float
    num_steps: int
    rel_rms_error: float  # of the fitted step times against the measured ones
    median_abs_rel_error: float

    def predict(self, flops: np.ndarray, nbytes: np.ndarray, num_reqs: np.ndarray) -> np.ndarray:
        return (
            self.per_step_s
            + self.per_request_s * num_reqs
            + flops / self.flops_per_s
            + nbytes / self.bytes_per_s
        )


def _features(
    records: Sequence[StepRecord], arch: ArchConfig, precision: Precision
) -> tuple[np.ndarray, ...]:
    flops, nbytes, reqs, wall = [], [], [], []
    for rec in records:
        cost = step_cost(arch, rec.batch_shape(), precision)
        flops.append(cost.flops)
        nbytes.append(cost.total_bytes)
        reqs.append(rec.num_reqs)
        wall.append(rec.wall_time_s)
    return tuple(np.asarray(x, dtype=float) for x in (flops, nbytes, reqs, wall))


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients, by trying every active set (4 columns)."""
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


def fit_trace(
    records: Sequence[StepRecord], arch: ArchConfig, precision: Precision | None = None
) -> CalibrationFit:
    """Fit step times of `records` (a model `arch` run at `precision`)."""
    records = [r for r in records if r.wall_time_s > 0 and r.num_reqs > 0]
    if len(records) < 8:
        raise ConfigError(f"calibration needs at least 8 timed steps, got {len(records)}")
    precision = precision or Precision(weights="fp32")
    flops, nbytes, reqs, wall = _features(records, arch, precision)
    # Columns scaled to similar magnitudes so lstsq is well conditioned; rows by 1 / wall.
    scales = np.array([1.0, 1.0, max(flops.max(), 1.0), max(nbytes.max(), 1.0)])
    a = np.stack([np.ones_like(wall), reqs, flops, nbytes], axis=1) / scales
    coef = _nnls(a / wall[:, None], np.ones_like(wall)) / scales
    fit = CalibrationFit(
        per_step_s=float(coef[0]),
        per_request_s=float(coef[1]),
        flops_per_s=float(1.0 / coef[2]) if coef[2] > 0 else _UNBOUNDED,
        bytes_per_s=float(1.0 / coef[3]) if coef[3] > 0 else _UNBOUNDED,
        num_steps=len(records),
        rel_rms_error=0.0,
        median_abs_rel_error=0.0,
    )
    rel = fit.predict(flops, nbytes, reqs) / wall - 1
    return CalibrationFit(
        **{
            **fit.__dict__,
            "rel_rms_error": float(np.sqrt(np.mean(rel**2))),
            "median_abs_rel_error": float(np.median(np.abs(rel))),
        }
    )


def _memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 16e9


def profile_dict(fit: CalibrationFit, origin: str, precision: Precision) -> dict:
    """The fitted machine in the hardware catalogue's schema."""
    src = (
        f"[fitted] {fit.num_steps} steps of {origin} ({precision.describe()}), "
        f"{time.strftime('%Y-%m-%d')}, rel. RMS error {fit.rel_rms_error:.1%}"
    )
    compute_key = f"{Precision(weights=precision.weights).weight_format.compute_dtype}_tflops"
    peak = {"value": fit.flops_per_s / 1e12, "source": src}
    return {
        "name": THIS_MACHINE,
        "display_name": "this machine (calibrated)",
        "aliases": ["local", "here"],
        "kind": "cpu",
        "scheduling": "dynamic",
        "calibrated": True,
        "overlap_compute_memory": False,
        "memory": [
            {
                "name": "ram",
                "holds": ["weights", "kv", "activations"],
                "capacity_gb": {"value": _memory_bytes() / 1e9, "source": "[measured] os.sysconf"},
                "bandwidth_gb_s": {"value": fit.bytes_per_s / 1e9, "source": src},
                "efficiency": {"value": 1.0, "source": "folded into the fitted bandwidth"},
            }
        ],
        "compute": {
            compute_key: peak,
            "fp32_tflops": peak,
            "efficiency": {"value": 1.0, "source": "folded into the fitted rate"},
        },
        "runtime": {
            "per_step_overhead_us": {"value": fit.per_step_s * 1e6, "source": src},
            "per_request_overhead_us": {"value": fit.per_request_s * 1e6, "source": src},
            "per_kernel_overhead_us": {"value": 0.0, "source": "folded into per_step_overhead"},
            "step_jitter_cv": {"value": fit.rel_rms_error, "source": src},
            "usable_memory_fraction": {"value": 0.5, "source": "[guess] leave room for the OS"},
        },
        "links": {
            "scale_up": {
                "bandwidth_gb_s": {"value": 10, "source": "[guess] a single machine"},
                "latency_us": {"value": 10, "source": "[guess] a single machine"},
                "domain_size": {"value": 1, "source": "a single machine"},
            }
        },
        "economics": {
            "price_per_hour_usd": {"value": 0.0, "source": "already owned"},
            "power_w": {"value": 65, "source": "[guess] a desktop-class CPU under load"},
        },
    }


def write_calibration(profile: dict, path: Path | None = None) -> Path:
    path = path or calibrated_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=2) + "\n", encoding="utf-8")
    return path
