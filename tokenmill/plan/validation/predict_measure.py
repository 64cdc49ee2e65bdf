"""One workload two ways, the halves of `tokenmill plan validate`: predicted by the planner's
simulation on the calibrated this-machine profile, and measured by `tokenmill bench serve`
against a `tokenmill serve` started with the same settings (tokenmill.plan.validation.run)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tokenmill.bench.machine_load import cpu_seconds, others_cpu_since
from tokenmill.bench.serve_process import ServeProcess
from tokenmill.config import DTYPES, SchedulerConfig
from tokenmill.errors import ConfigError
from tokenmill.models.arch_config import ArchConfig
from tokenmill.perf.dtypes import Precision
from tokenmill.perf.kv_memory import num_kv_blocks
from tokenmill.plan.calibration.served import engine_serve_args
from tokenmill.plan.hardware import THIS_MACHINE, get_hardware
from tokenmill.plan.metrics import summarize
from tokenmill.plan.placement import place
from tokenmill.plan.sim_runner import CostModelStepTime, SimRunner
from tokenmill.plan.simulate import SimConfig, simulate
from tokenmill.plan.step_time import LayoutStepTime
from tokenmill.plan.validation.results import RunMetrics
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
