"""How well the calibrated step-time model predicts the steps a served run actually took.

`tokenmill plan validate` runs its server with `--step-trace`, so every served step (batch
shape, wall time) is on record. Predicting those steps with the calibration's fit separates the
two ways a validation row can miss: the step-time model (a bias per step kind shows here) or
everything around the steps (scheduling, the server's time between steps), when these errors
are small and the row still misses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from tokenmill.models.arch_config import ArchConfig
from tokenmill.perf.dtypes import Precision
from tokenmill.perf.trace import StepRecord
from tokenmill.plan.calibrate import CalibrationFit, evaluate

KINDS = ("all", "decode", "prefill", "mixed")


def served_step_errors(
    records: Sequence[StepRecord], first: int, count: int, calibration: dict,
    arch: ArchConfig, precision: Precision,
) -> dict[str, dict]:  # fmt: skip
    """Errors of the calibration's fit on served steps [first, first + count), per step kind."""
    fit = CalibrationFit(**calibration["fit"])
    steps = [r for r in records[first : first + count] if r.wall_time_s > 0 and r.num_reqs > 0]
    if not steps:
        return {}
    return {kind: asdict(e) for kind, e in evaluate(fit, steps, arch, precision).items()}


def _cell(errors: dict, kind: str) -> str:
    e = errors.get(kind)
    if not e or not e["num_steps"]:
        return "-"
    return f"{e['mean']:+.1%} / {e['rms']:.1%} ({e['num_steps']})"


def format_served_steps(rows: Sequence[tuple[str, dict]]) -> list[str]:
    """(arrivals, errors) per run -> a markdown table; nothing when no run has errors."""
    rows = [(name, errors) for name, errors in rows if errors]
    if not rows:
        return []
    return [
        "Served steps predicted by the calibrated step model (bias / RMS of (predicted - "
        "measured) / measured, and the number of steps), per step kind:",
        "",
        "| arrivals | " + " | ".join(KINDS) + " |",
        "|---|" + "---|" * len(KINDS),
        *(f"| {name} | " + " | ".join(_cell(e, k) for k in KINDS) + " |" for name, e in rows),
        "",
    ]
