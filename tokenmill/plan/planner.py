"""One plan: place a model on a hardware type, simulate the workload through the engine's own
scheduler on that placement, and price the result.

Replicas split the load evenly (concurrency, rate and requests divided by their number), so one
replica is simulated and its throughput multiplied.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenmill.config import SchedulerConfig
from tokenmill.errors import ConfigError
from tokenmill.perf.dtypes import Precision
from tokenmill.plan.economics import Economics, economics
from tokenmill.plan.hardware import THIS_MACHINE, HardwareSpec, get_hardware
from tokenmill.plan.metrics import SimMetrics, summarize
from tokenmill.plan.models import ModelEntry, get_model
from tokenmill.plan.placement import Placement, place
from tokenmill.plan.sim_runner import CostModelStepTime, SimRunner, SpecDecodeConfig
from tokenmill.plan.simulate import SimConfig, SimResult, simulate
from tokenmill.plan.step_time import LayoutStepTime
from tokenmill.workload.arrivals import ArrivalSpec
from tokenmill.workload.sharegpt import TextEncoder
from tokenmill.workload.slo import SLO
from tokenmill.workload.spec import LengthSpec, build_workload, parse_workload
from tokenmill.workload.types import Workload

DEFAULT_KV_SEQS_FOR_RATE = 32


@dataclass(frozen=True)
class PlanRequest:
    model: str
    hardware: str
    workload: str = "fixed:in=1000,out=1000"
    concurrency: int | None = None
    rate: float | None = None
    burstiness: float = 1.0
    num_prompts: int | None = None  # None: 4 x concurrency (at least 64), or 200 at a rate
    precision: Precision = field(default_factory=Precision)
    chips: int | None = None  # per replica; None: the fewest that fit
    tp: int | None = None
    replicas: int = 1
    slo: SLO | None = None
    spec: SpecDecodeConfig | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    kv_seqs: int | None = None  # sequences the placement must hold KV for
    seed: int = 0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.concurrency is None and self.rate is None:
            raise ConfigError("give --concurrency N (closed loop) or --rate R (requests/s)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise ConfigError(f"rate must be > 0 requests/s, got {self.rate}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ConfigError(f"number of prompts must be >= 1, got {self.num_prompts}")
        if self.replicas < 1:
            raise ConfigError(f"replicas must be >= 1, got {self.replicas}")


@dataclass(frozen=True)
class PlanResult:
    request: PlanRequest
    model: ModelEntry
    hardware: HardwareSpec
    placement: Placement
    metrics: SimMetrics
    economics: Economics
    workload: str
    notes: tuple[str, ...]
    num_steps: int
    sim_wall_s: float


def replica_workload(req: PlanRequest, spec: LengthSpec, tokenizer: TextEncoder | None) -> Workload:
    r = req.replicas
    concurrency = None if req.concurrency is None else math.ceil(req.concurrency / r)
    rate = math.inf if req.rate is None else req.rate / r
    total = req.num_prompts or (max(4 * req.concurrency, 64) if req.concurrency else 200)
    arrivals = ArrivalSpec(rate, req.burstiness, concurrency)
    return build_workload(spec, math.ceil(total / r), arrivals, tokenizer, req.seed)


def kv_target(req: PlanRequest, workload: Workload) -> tuple[int, int]:
    """(sequences, tokens) the placement must hold KV for."""
    seqs = (
        req.kv_seqs
        or workload.max_concurrency
        or min(workload.num_requests, DEFAULT_KV_SEQS_FOR_RATE)
    )
    return seqs, seqs * math.ceil(workload.mean_seq_len)


def run_plan(
    req: PlanRequest,
    tokenizer_loader: Callable[[], TextEncoder] | None = None,
    workload: Workload | None = None,
) -> PlanResult:
    """Place, simulate and price `req`. `tokenizer_loader` is called only for ShareGPT."""
    model, hw = get_model(req.model), get_hardware(req.hardware)
    spec = parse_workload(req.workload)
    notes: list[str] = []
    if workload is None:
        tokenizer = None
        if spec.needs_tokenizer:
            if tokenizer_loader is None:
                raise ConfigError("the ShareGPT workload needs a tokenizer")
            tokenizer = tokenizer_loader()
        workload = replica_workload(req, spec, tokenizer)
    seqs, kv_tokens = kv_target(req, workload)
    placement = place(
        model.arch, hw, req.precision, kv_tokens, req.chips, req.tp, req.replicas, model.name
    )
    result, wall = _simulate(req, model, hw, placement, workload)
    metrics = summarize(result, req.slo)
    busy = result.prefill_time_s + result.decode_time_s
    econ = economics(
        metrics, hw, placement.num_chips, req.replicas, result.prefill_time_s / busy if busy else 0
    )
    if hw.name == THIS_MACHINE and not hw.calibrated:
        notes.append("this-machine is an UNCALIBRATED default; calibrate it for real predictions")
    if metrics.num_preemptions:
        notes.append(f"{metrics.num_preemptions} preemptions: the KV cache ran short")
    notes.append(f"KV sized for {seqs} sequences of {kv_tokens // max(seqs, 1)} tokens")
    return PlanResult(
        req, model, hw, placement, metrics, econ, workload.description, tuple(notes),
        result.num_steps, wall,
    )  # fmt: skip


def _simulate(
    req: PlanRequest, model: ModelEntry, hw: HardwareSpec, placement: Placement, workload: Workload
) -> tuple[SimResult, float]:
    step_model = LayoutStepTime(model.arch, hw, req.precision, placement)
    runner = SimRunner(
        CostModelStepTime(step_model, req.spec),
        jitter_cv=hw.profile.step_jitter_cv if req.jitter else 0.0,
        seed=req.seed,
        acceptance_rate=req.spec.acceptance_rate if req.spec else None,
    )
    config = SimConfig(
        num_blocks=placement.kv_capacity_tokens // req.block_size,
        max_model_len=model.arch.max_position_embeddings,
        block_size=req.block_size,
        scheduler=SchedulerConfig(
            max_num_seqs=req.max_num_seqs, max_num_batched_tokens=req.max_num_batched_tokens
        ),
        spec=req.spec,
    )
    start = time.perf_counter()
    result = simulate(workload, runner, config)
    return result, time.perf_counter() - start
