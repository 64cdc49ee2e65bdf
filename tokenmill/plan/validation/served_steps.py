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

import numpy as np

from tokenmill.models.arch_config import ArchConfig
from tokenmill.perf.dtypes import Precision
from tokenmill.perf.trace import StepRecord
from tokenmill.plan.calibration.fit import CalibrationFit, StepFeatures, evaluate

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


def fit_serving_cost(
    groups: Sequence[Sequence[StepRecord]], calibration: dict, arch: ArchConfig,
    precision: Precision,
) -> tuple[float, float] | None:  # fmt: skip
    """(a, c) such that served steps without prompt tokens take a x the calibrated fit's time +
    c seconds per request in the step, by least squares on the relative error: each group of
    steps (one speed probe each) has its own a (the machine's speed drifts), all share c, and a
    is the last group's. None with too few such steps or batch sizes. A server streams each
    token around the engine's step, which a calibration in one process never sees: on a 2-core
    machine that cost grows with the batch (docs/planner.md, "The cost per streamed token"),
    so one factor cannot carry it. The validation fits one probe at a time (one group): pooled
    probes found no cost per request and predicted worse (the same section)."""
    steps, group = [], []
    for g, records in enumerate(groups):
        kept = [
            r for r in records if r.wall_time_s > 0 and r.num_reqs > 0 and not r.has_prompt_tokens
        ]
        steps += kept
        group += [g] * len(kept)
    last = len(groups) - 1
    group = np.asarray(group)
    if (group == last).sum() < 8 or len({r.num_reqs for r in steps}) < 2:
        return None
    fit = CalibrationFit(**calibration["fit"])
    feats = StepFeatures.of(steps, arch, precision)
    pred = fit.predict(feats)
    columns = [pred * (group == g) for g in range(len(groups))] + [feats.num_reqs]
    rows = np.stack(columns, axis=1) / feats.wall[:, None]
    keep = rows.any(axis=0)
    coef = np.zeros(rows.shape[1])
    coef[keep], *_ = np.linalg.lstsq(rows[:, keep], np.ones(len(steps)), rcond=None)
    a, c = coef[last], coef[-1]
    if c < 0 or a <= 0:  # no cost per request shows: one factor for the last group
        ratio = pred[group == last] / feats.wall[group == last]
        a, c = ratio.sum() / (ratio**2).sum(), 0.0
    return float(a), float(c)


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
