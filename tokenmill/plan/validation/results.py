"""The numbers of a validation: each run's compared metrics (predicted or measured), a row per
measured run and per rate (the medians of its runs), and the report they make up."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from tokenmill.plan.validation.report import TARGETS

if TYPE_CHECKING:
    from tokenmill.plan.validation.predict_measure import ValidationSettings


@dataclass
class RunMetrics:
    """The compared numbers of one run, predicted or measured (times in ms)."""

    tpot_median_ms: float
    output_tok_s: float
    ttft_p99_ms: float
    ttft_median_ms: float
    e2e_median_ms: float
    duration_s: float
    num_requests: int
    output_tokens: int
    num_steps: int | None = None  # engine steps (server: from /metrics)
    busy_s: float | None = None  # summed step time (server: from /metrics)
    # Cores' worth of CPU other processes (not the server, not the client) used meanwhile.
    others_cpu_share: float | None = None
    first_step: int | None = None  # the server's step count when the run began
    prompt_busy_s: float | None = None  # of busy_s, the steps that computed prompt tokens
    # The server's engine-loop iterations that ran a step: busy_s and the time around each step
    # (taking in requests, handing out outputs), which a request also waits (server: /metrics).
    loop_s: float | None = None


@dataclass
class ValidationRow:
    rate: float
    predicted: RunMetrics
    measured: RunMetrics | None
    loadavg_before: tuple[float, ...] = ()
    loadavg_after: tuple[float, ...] = ()
    served_steps: dict = field(default_factory=dict)  # step kind -> the fit's errors on them
    # The speed probe: factors of the steps without and with prompt tokens, and seconds per
    # request and per step added to the steps without (see speed_probe).
    speed: tuple[float, ...] | None = None
    unscaled: RunMetrics | None = None  # the prediction before the probe's scaling
    repeat: int = 0  # which of the rate's measured runs (a summary row: its number of runs)
    # A summary row: the lowest and highest measured value of each compared metric.
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)

    def errors(self, predicted: RunMetrics | None = None) -> dict[str, float]:
        """(predicted - measured) / measured per compared metric (of `predicted`, by default
        the row's prediction)."""
        predicted = predicted or self.predicted
        if self.measured is None:
            return {}
        return {
            key: getattr(predicted, key) / getattr(self.measured, key) - 1
            for key, _, _ in TARGETS
            if getattr(self.measured, key)
        }

    def passes(self) -> dict[str, bool]:
        errs = self.errors()
        return {key: abs(errs[key]) <= tol for key, _, tol in TARGETS if key in errs}


@dataclass
class ValidationReport:
    settings: ValidationSettings
    rows: list[ValidationRow] = field(default_factory=list)  # per rate (medians over runs)
    calibration: dict | None = None
    machine: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    runs: list[ValidationRow] = field(default_factory=list)  # every measured run, in order

    def as_dict(self) -> dict:
        settings = asdict(self.settings)
        settings["rates"] = [rate_json(r) for r in self.settings.rates]
        rows, runs = [], []
        for out, source in ((rows, self.rows), (runs, self.runs)):
            for row in source:
                out.append({
                    **asdict(row), "rate": rate_json(row.rate), "errors": row.errors(),
                    "passes": row.passes(),
                })  # fmt: skip
        calib = {
            k: v for k, v in (self.calibration or {}).items() if k not in ("groups", "holdout")
        }
        return {
            "settings": settings, "rows": rows, "runs": runs, "calibration": calib,
            "machine": self.machine,
            "elapsed_s": round(self.elapsed_s, 1),
            "targets": {key: tol for key, _, tol in TARGETS},
        }  # fmt: skip


def rate_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def summarize_runs(row: ValidationRow, runs: list[ValidationRow]) -> ValidationRow:
    """A rate's row from its measured runs: the median of each prediction and measurement (and
    probe factor), the measurements' lowest and highest values, `repeat` = the number of runs."""
    if not runs:
        return row
    measured = [r.measured for r in runs]
    spread = {
        key: (min(getattr(m, key) for m in measured), max(getattr(m, key) for m in measured))
        for key, _, _ in TARGETS
    }
    speeds = [r.speed for r in runs if r.speed]
    return ValidationRow(
        row.rate, median_metrics([r.predicted for r in runs]), median_metrics(measured),
        runs[0].loadavg_before, runs[-1].loadavg_after,
        served_steps=runs[0].served_steps if len(runs) == 1 else {},
        speed=tuple(statistics.median(s[i] for s in speeds) for i in range(len(speeds[0])))
        if speeds else None,
        unscaled=runs[0].unscaled, repeat=len(runs), spread=spread,
    )  # fmt: skip


def median_metrics(items: list[RunMetrics]) -> RunMetrics:
    """Field by field, the median of `items` (a field None in any of them stays None)."""
    values = {}
    for f in fields(RunMetrics):
        column = [getattr(m, f.name) for m in items]
        if any(v is None for v in column):
            values[f.name] = None
        else:
            mid = statistics.median(column)
            values[f.name] = round(mid) if isinstance(column[0], int) else mid
    return RunMetrics(**values)
