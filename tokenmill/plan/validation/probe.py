"""The speed probe: how this machine serves now against its calibration, measured just before
each validation run on the same server (docs/planner.md, "The speed probe"). A shared machine's
speed drifts from minute to minute by more than the TPOT target, and decode steps and steps with
prompt chunks drift apart, so the probe's factors scale the two kinds of steps in that run's
prediction apart."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

from tokenmill.bench.serve_process import ServeProcess
from tokenmill.errors import ConfigError
from tokenmill.perf.dtypes import Precision
from tokenmill.perf.trace import read_trace
from tokenmill.plan.calibration.profile import read_calibration
from tokenmill.plan.validation.predict_measure import (
    ValidationSettings,
    build_validation_workload,
    measure,
    predict,
)
from tokenmill.plan.validation.results import RunMetrics
from tokenmill.plan.validation.served_steps import fit_serving_cost


def speed_probe(
    server: ServeProcess, settings: ValidationSettings, info, json_path: Path,
    trace_path: Path | None = None,
) -> tuple[float, ...]:  # fmt: skip
    """How this machine serves now against its calibration: a few other requests of the
    workload, all at once, measured against their prediction. Steps with prompt tokens: one
    factor, measured over predicted time. Steps without: with the server's step trace
    (`trace_path`, written as the server goes idle), the factor a and the seconds c per request
    that fit those of the probe's steps (batches from the probe's size down to 1), and the
    engine loop's time around each step; without it, one factor of the loop's time less the
    prompt steps' over their prediction. Returns (decode factor, prompt factor, c, per step)."""
    probe = replace(
        settings, num_prompts=settings.speed_probe_prompts, seed=settings.seed + 1000,
        num_warmup=0,
    )  # fmt: skip
    predicted = predict(
        build_validation_workload(probe, math.inf, info.tokenizer), info.arch, probe
    )
    measured = measure(server, probe, math.inf, json_path)
    factors = []
    for kind, pred, meas in (
        ("decode", predicted.busy_s - predicted.prompt_busy_s,
         _loop_or_busy(measured) - measured.prompt_busy_s),
        ("prompt", predicted.prompt_busy_s, measured.prompt_busy_s),
    ):  # fmt: skip
        if not pred > 0 or not meas > 0:
            raise ConfigError(
                f"the speed probe ran no {kind} steps (predicted {pred:.3f} s, measured "
                f"{meas:.3f} s): use more --speed-probe-prompts"
            )
        factors.append(meas / pred)
    steps = (
        _served_steps(trace_path, measured.first_step, measured.num_steps) if trace_path else None
    )
    cost = None
    if steps:
        precision = Precision(weights=settings.dtype)
        cost = fit_serving_cost([steps], read_calibration(), info.arch, precision)
    if cost is None:  # no trace to fit: one factor, nothing added per request or step
        return factors[0], factors[1], 0.0, 0.0
    per_step = max(0.0, (_loop_or_busy(measured) - measured.busy_s) / max(measured.num_steps, 1))
    return cost[0], factors[1], cost[1], per_step


def _served_steps(path: Path, first: int, count: int, timeout_s: float = 30.0):
    """Records [first, first + count) of the server's step trace, once it has written them (it
    appends as it goes idle); None if it has not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = read_trace(path)
        except (OSError, ValueError):  # not there yet, or a line still being written
            records = []
        if len(records) >= first + count:
            return records[first : first + count]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def _loop_or_busy(m: RunMetrics) -> float:
    """The engine loop's time, or the steps' alone from a server without that counter."""
    return m.loop_s if m.loop_s is not None and math.isfinite(m.loop_s) else m.busy_s
