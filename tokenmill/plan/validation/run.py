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

import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tokenmill.bench.machine_load import cpu_seconds, load_average, others_cpu_since
from tokenmill.bench.serve_process import ServeProcess
from tokenmill.config import DTYPES, SchedulerConfig
from tokenmill.errors import ConfigError
from tokenmill.models.arch_config import ArchConfig
from tokenmill.perf.dtypes import Precision
from tokenmill.perf.kv_memory import num_kv_blocks
from tokenmill.perf.trace import read_trace
from tokenmill.plan.calibration.profile import read_calibration
from tokenmill.plan.calibration.served import engine_serve_args
from tokenmill.plan.hardware import THIS_MACHINE, get_hardware
from tokenmill.plan.metrics import summarize
from tokenmill.plan.placement import place
from tokenmill.plan.sim_runner import CostModelStepTime, SimRunner
from tokenmill.plan.simulate import SimConfig, simulate
from tokenmill.plan.step_time import LayoutStepTime
from tokenmill.plan.validation.report import format_row
from tokenmill.plan.validation.results import (
    RunMetrics,
    ValidationReport,
    ValidationRow,
    rate_json,
    summarize_runs,
)
from tokenmill.plan.validation.served_steps import fit_serving_cost, served_step_errors
from tokenmill.workload import ArrivalSpec, Workload, build_workload, parse_workload


@dataclass(frozen=True)
class ValidationSettings:
    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    dtype: str = "float32"
    workload: str = "sharegpt"
    num_prompts: int = 48
    rates: tuple[float, ...] = (0.5, 1.0, 2.0, math.inf)  # requests/s; inf: all at once
    burstiness: float = 1.0
    seed: int = 0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    block_size: int = 16
    kv_cache_memory_gib: float = 1.0
    num_warmup: int = 1
    jitter: bool = False  # the simulator's step-time jitter (the fit's residual spread)
    speed_probe_prompts: int = 16  # requests of the speed probe before each run; 0: none
    repeats: int = 1  # measured runs per rate (in turn over the rates); the table: their medians

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.num_prompts < 1:
            raise ConfigError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.speed_probe_prompts < 0:
            raise ConfigError(
                f"--speed-probe-prompts must be >= 0 (0: no probe), got {self.speed_probe_prompts}"
            )
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {self.repeats}")
        if not self.rates or any(not r > 0 for r in self.rates):
            raise ConfigError(f"rates must be > 0 requests/s (or inf), got {self.rates}")
        parse_workload(self.workload)

    def serve_args(self) -> list[str]:
        return [*engine_serve_args(self), "--max-queue", str(max(4096, self.num_prompts))]


def build_validation_workload(settings: ValidationSettings, rate: float, tokenizer) -> Workload:
    """What `tokenmill bench serve --workload W --num-prompts N --seed S --request-rate R`
    sends (tokenmill.cli.bench_serve builds it the same way)."""
    spec = parse_workload(settings.workload)
    arrivals = ArrivalSpec(rate, settings.burstiness, None)
    tok = tokenizer if spec.needs_tokenizer else None
    return build_workload(spec, settings.num_prompts, arrivals, tokenizer=tok, seed=settings.seed)


def predict(
    workload: Workload,
    arch: ArchConfig,
    settings: ValidationSettings,
    speed: tuple[float, ...] = (1.0, 1.0),
) -> RunMetrics:
    """The planner's prediction of `workload` on the calibrated this-machine, the times of its
    steps without and with prompt tokens multiplied by `speed` (decode, prompt factors, then
    optionally seconds added to each decode step per request and once)."""
    hw = get_hardware(THIS_MACHINE)
    if not hw.calibrated:
        raise ConfigError("this-machine is not calibrated; run `tokenmill plan calibrate` first")
    precision = Precision(weights=settings.dtype)
    # The blocks `tokenmill serve --kv-cache-memory` allocates.
    num_blocks = num_kv_blocks(
        arch, settings.block_size, settings.dtype, settings.kv_cache_memory_gib
    )
    placement = place(arch, hw, precision, 0, chips=1)
    runner = SimRunner(
        CostModelStepTime(LayoutStepTime(arch, hw, precision, placement)),
        jitter_cv=hw.profile.step_jitter_cv if settings.jitter else 0.0,
        seed=settings.seed,
        decode_time_scale=speed[0],
        prompt_time_scale=speed[1],
        decode_per_request_s=speed[2] if len(speed) > 2 else 0.0,
        decode_per_step_s=speed[3] if len(speed) > 3 else 0.0,
    )
    config = SimConfig(
        num_blocks=num_blocks,
        max_model_len=min(arch.max_position_embeddings, num_blocks * settings.block_size),
        block_size=settings.block_size,
        scheduler=SchedulerConfig(
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
        ),
        enable_prefix_caching=False,
    )
    result = simulate(workload, runner, config)
    m = summarize(result)
    return RunMetrics(
        tpot_median_ms=m.tpot.median * 1e3, output_tok_s=m.output_tok_s,
        ttft_p99_ms=m.ttft.p99 * 1e3, ttft_median_ms=m.ttft.median * 1e3,
        e2e_median_ms=m.e2e.median * 1e3, duration_s=m.duration_s, num_requests=m.num_requests,
        output_tokens=m.output_tokens, num_steps=result.num_steps,
        busy_s=result.prefill_time_s + result.decode_time_s,
        prompt_busy_s=result.prefill_time_s + result.decode_time_s - runner.decode_step_time_s,
    )  # fmt: skip


def measure(
    server: ServeProcess, settings: ValidationSettings, rate: float, json_path: Path
) -> RunMetrics:
    """One `tokenmill bench serve` run against `server` (a subprocess, as a user runs it)."""
    cmd = [
        sys.executable, "-m", "tokenmill.cli.main", "bench", "serve",
        "--base-url", server.base_url, "--workload", settings.workload,
        "--num-prompts", str(settings.num_prompts), "--seed", str(settings.seed),
        "--request-rate", str(rate), "--burstiness", str(settings.burstiness),
        "--num-warmup", str(settings.num_warmup), "--json", str(json_path), "--no-progress",
        "--per-request",
    ]  # fmt: skip
    if settings.model:
        cmd += ["--tokenizer", settings.model]
    steps0, busy0, prompt0, loop0 = server.engine_counters()
    cpu0, server0, wall0 = cpu_seconds(), server.cpu_seconds(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    others = others_cpu_since(cpu0, server.cpu_seconds() - server0)
    wall = time.perf_counter() - wall0
    steps1, busy1, prompt1, loop1 = server.engine_counters()
    if not json_path.exists():
        raise ConfigError(f"bench serve failed ({done.returncode}):\n{done.stderr[-2000:]}")
    m = json.loads(json_path.read_text())["metrics"]
    if m["num_failed"]:
        raise ConfigError(f"bench serve: {m['num_failed']} requests failed; see {json_path}")
    return RunMetrics(
        tpot_median_ms=m["tpot"]["median"], output_tok_s=m["output_throughput"],
        ttft_p99_ms=m["ttft"]["p99"], ttft_median_ms=m["ttft"]["median"],
        e2e_median_ms=m["e2el"]["median"], duration_s=m["duration_s"],
        num_requests=m["num_completed"], output_tokens=m["total_output_tokens"],
        num_steps=int(steps1 - steps0), busy_s=busy1 - busy0, prompt_busy_s=prompt1 - prompt0,
        others_cpu_share=None if others is None else others / wall, first_step=int(steps0),
        loop_s=loop1 - loop0,
    )  # fmt: skip


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
