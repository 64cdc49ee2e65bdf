"""Predicted vs measured serving on this machine: the planner's honest check.

For each arrival pattern (Poisson request rates, all at once) one workload (the same ShareGPT
sample, seed and arrival offsets) goes two ways:

    predicted   simulate(): the engine's own Scheduler and KVCacheManager with the server's
                settings (max_num_seqs, max_num_batched_tokens, KV blocks, block size) on a
                SimRunner timed by the calibrated this-machine profile
    measured    `tokenmill bench serve` against a `tokenmill serve` started here with the same
                settings, on this machine

and the table compares median TPOT and output throughput (target: within 10%) and p99 TTFT
(within 25%). The server's own counters (/metrics: engine steps and their summed time) split a
miss between the step-time model (busy time) and what happens outside the engine's steps.

A shared machine's speed drifts from minute to minute by more than the TPOT target, and decode
steps (memory-bound) and steps with prompt chunks (compute-bound) drift differently
(docs/planner.md, "The speed probe"). So before each measured run a short speed
probe (a few other requests of the same workload, all at once) goes to the same server; its
measured over predicted time, for the steps without and with prompt tokens apart (the server
counts both), scales the two kinds of steps in that run's prediction; the probe's own served
steps (the server appends its step trace when idle) also price a cost per request in each
decode step, the streaming of each token. The unscaled prediction is kept and reported beside
it. `--repeats N` measures every rate N times, in turn over the rates, and compares medians.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from tokenmill.bench.machine_load import load_average
from tokenmill.bench.serve_process import ServeProcess
from tokenmill.errors import ConfigError
from tokenmill.perf.dtypes import Precision
from tokenmill.perf.trace import read_trace
from tokenmill.plan.calibration.profile import read_calibration
from tokenmill.plan.hardware import THIS_MACHINE, get_hardware
from tokenmill.plan.validation.predict_measure import (
    ValidationSettings,
    build_validation_workload,
    measure,
    predict,
)
from tokenmill.plan.validation.probe import speed_probe
from tokenmill.plan.validation.report import format_row
from tokenmill.plan.validation.results import (
    ValidationReport,
    ValidationRow,
    rate_json,
    summarize_runs,
)
from tokenmill.plan.validation.served_steps import served_step_errors
from tokenmill.workload import Workload


def check_calibration(settings: ValidationSettings) -> dict:
    calibration = read_calibration()
    if calibration is None or not get_hardware(THIS_MACHINE).calibrated:
        raise ConfigError("this-machine is not calibrated; run `tokenmill plan calibrate` first")
    dtype = calibration.get("engine", {}).get("dtype")
    if dtype != settings.dtype:
        raise ConfigError(
            f"this-machine was calibrated with --dtype {dtype}, not {settings.dtype}; "
            f"run `tokenmill plan calibrate --dtype {settings.dtype}` (or validate --calibrate)"
        )
    return calibration


def run_validation(
    settings: ValidationSettings, do_measure: bool = True, work_dir: Path | None = None, log=print
) -> ValidationReport:
    """Predict every rate; with `do_measure`, also serve and measure each (one server)."""
    from tokenmill.bench.report import machine_info
    from tokenmill.bench.serve import open_model_info

    start = time.perf_counter()
    calibration = check_calibration(settings)
    info = open_model_info(settings.model)
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="tokenmill-validate-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    report = ValidationReport(settings, calibration=calibration, machine=machine_info())
    workloads = [build_validation_workload(settings, r, info.tokenizer) for r in settings.rates]
    rows = [
        ValidationRow(rate, predict(w, info.arch, settings), None)
        for rate, w in zip(settings.rates, workloads, strict=True)
    ]
    report.rows = rows
    if not do_measure:
        report.elapsed_s = time.perf_counter() - start
        return report
    trace_path = work_dir / "serve-trace.jsonl"
    serve_args = [*settings.serve_args(), "--step-trace", str(trace_path)]
    with ServeProcess(serve_args, work_dir / "serve.log") as server:
        log(f"tokenmill serve up at {server.base_url} (log: {work_dir / 'serve.log'})")
        # In turn over the rates, so each rate's runs sample different minutes of the drift.
        for repeat in range(settings.repeats):
            for row, workload in zip(rows, workloads, strict=True):
                run = _measure_run(server, settings, info, row, workload, repeat, work_dir)
                report.runs.append(run)
                log(format_row(run))
    if trace_path.exists():  # written as the server stopped
        served = read_trace(trace_path)
        precision = Precision(weights=settings.dtype)
        for run in report.runs:
            m = run.measured
            run.served_steps = served_step_errors(
                served, m.first_step, m.num_steps, calibration, info.arch, precision
            )
    report.rows = [
        summarize_runs(row, [r for r in report.runs if r.rate == row.rate]) for row in rows
    ]
    report.elapsed_s = time.perf_counter() - start
    return report


def _measure_run(
    server: ServeProcess, settings: ValidationSettings, info, row: ValidationRow,
    workload: Workload, repeat: int, work_dir: Path,
) -> ValidationRow:  # fmt: skip
    """One measured run of `row`'s rate (after its speed probe, which scales its prediction)."""
    run = ValidationRow(row.rate, row.predicted, None, repeat=repeat)
    name = f"rate-{rate_json(row.rate)}" + (f"-{repeat + 1}" if settings.repeats > 1 else "")
    if settings.speed_probe_prompts:
        run.speed = speed_probe(
            server, settings, info, work_dir / f"probe-{name}.json",
            work_dir / "serve-trace.jsonl",
        )  # fmt: skip
        run.unscaled = row.predicted
        run.predicted = predict(workload, info.arch, settings, run.speed)
    run.loadavg_before = load_average()
    run.measured = measure(server, settings, row.rate, work_dir / f"bench-{name}.json")
    run.loadavg_after = load_average()
    return run
