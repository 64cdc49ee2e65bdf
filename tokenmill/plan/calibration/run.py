"""`tokenmill plan calibrate`: run the engine here through serving's batch shapes
(scenarios.py), fit this machine's profile to the step times (fit.py), keeping the model (sum
or max per operator) whose error on the held-out steps is lower, and write the profile
(profile.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenmill.errors import ConfigError
from tokenmill.perf.dtypes import Precision
from tokenmill.plan.calibration.fit import CalibrationFit, ErrorSummary, evaluate, fit_trace
from tokenmill.plan.calibration.profile import profile_dict, write_calibration
from tokenmill.plan.calibration.scenarios import (
    CalibrationSettings,
    CalibrationTrace,
    record_calibration_trace,
)
from tokenmill.plan.hardware import calibrated_path


@dataclass
class CalibrationReport:
    fit: CalibrationFit  # on every step (the written profile)
    holdout_fit: CalibrationFit  # on the steps not held out
    holdout_errors: dict[str, ErrorSummary]  # of holdout_fit on the held-out steps
    train_errors: dict[str, ErrorSummary]
    candidates: dict[str, float] = field(default_factory=dict)  # model -> held-out RMS
    num_disturbed: int = 0  # steps left out: other processes took CPU time during them

    def summary(self) -> dict:
        return {
            "fit": asdict(self.fit),
            "holdout_fit": asdict(self.holdout_fit),
            "holdout_errors": {k: asdict(v) for k, v in self.holdout_errors.items()},
            "train_errors": {k: asdict(v) for k, v in self.train_errors.items()},
            "model_candidates_holdout_rms": self.candidates,
            "num_disturbed_steps": self.num_disturbed,
        }


def fit_calibration(trace: CalibrationTrace, precision: Precision, combine: str = "auto"):
    """Fit the sum and max models on the clean steps not held out, keep the one whose error on
    the clean held-out steps is lower (or the one `combine` names), and refit it on every
    clean step. Steps disturbed by other processes are left out of both."""
    clean = [not d for d in trace.disturbed]
    recs = [r for r, c in zip(trace.records, clean, strict=True) if c]
    held = [h for h, c in zip(trace.holdout, clean, strict=True) if c]
    train = [r for r, h in zip(recs, held, strict=True) if not h]
    test = [r for r, h in zip(recs, held, strict=True) if h]
    if not test:
        raise ConfigError("the calibration holds out no undisturbed steps; add a holdout scenario")
    options = {"sum": False, "max": True}
    if combine != "auto":
        if combine not in options:
            raise ConfigError(f"combine must be auto, sum or max, got {combine!r}")
        options = {combine: options[combine]}
    results = {}
    for name, overlap in options.items():
        fit = fit_trace(train, trace.arch, precision, overlap)
        results[name] = (fit, evaluate(fit, test, trace.arch, precision))
    best = min(results, key=lambda k: results[k][1]["all"].rms)
    holdout_fit, holdout_errors = results[best]
    return CalibrationReport(
        fit=fit_trace(recs, trace.arch, precision, options[best]),
        holdout_fit=holdout_fit,
        holdout_errors=holdout_errors,
        train_errors=evaluate(holdout_fit, train, trace.arch, precision),
        candidates={k: v[1]["all"].rms for k, v in results.items()},
        num_disturbed=len(trace.records) - len(recs),
    )


def calibrate(
    settings: CalibrationSettings,
    combine: str = "auto",
    out_path: Path | None = None,
    trace_path: Path | None = None,
    progress=None,
) -> tuple[CalibrationReport, CalibrationTrace, Path]:
    """Record the trace, fit it, write the profile (and the trace); `tokenmill plan calibrate`."""
    from tokenmill.perf.trace import write_trace

    trace = record_calibration_trace(settings, progress)
    precision = Precision(weights=settings.dtype)
    report = fit_calibration(trace, precision, combine)
    out_path = out_path or calibrated_path()
    trace_path = trace_path or out_path.with_name(out_path.stem + "-trace.jsonl")
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    write_trace(trace_path, trace.records)
    info = {
        "engine": settings.engine_settings(),
        "model": settings.model or "bundled SmolLM2-135M-Instruct",
        "served": settings.served,
        "torch_threads": _torch_threads(),
        "trace": str(trace_path),
        "groups": trace.groups,
        "holdout": trace.holdout,
        "elapsed_s": round(trace.elapsed_s, 1),
        "loadavg_before": trace.loadavg_before,
        "loadavg_after": trace.loadavg_after,
        "others_cpu_s": trace.others_cpu_s,
        "num_scenario_retries": trace.num_retries,
        **report.summary(),
    }
    origin = f"tokenmill plan calibrate --dtype {settings.dtype}" + (
        " --served" if settings.served else ""
    )
    path = write_calibration(profile_dict(report.fit, origin, precision, info), out_path)
    return report, trace, path


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
