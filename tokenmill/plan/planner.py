"""One plan: place a model on a hardware type, simulate the workload through the engine's own
scheduler on that placement, and price the result.

Replicas share the load (round robin at a rate, users split at a concurrency); one replica is
simulated with a full sample of its own and the deployment's throughput scaled from it
(plan/load.py). The placement holds KV for the requests that can be in flight: at a concurrency
the fewest of users, requests and `max_num_seqs`; at a rate, Little's law on the step model.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenmill.config import SchedulerConfig
from tokenmill.errors import ConfigError
from tokenmill.perf.dtypes import Precision
from tokenmill.plan.economics import Economics, economics
from tokenmill.plan.hardware import THIS_MACHINE, HardwareSpec, get_hardware
from tokenmill.plan.load import (
    MAX_OPEN_SAMPLE,
    MIN_CLOSED_PROMPTS,
    MIN_PERIODS,
    ReplicaLoad,
    closed_loop,
    estimate_inflight,
    length_sample,
    max_open_requests,
    num_open_measured,
    open_loop,
    replica_users,
)
from tokenmill.plan.metrics import SimMetrics, summarize
from tokenmill.plan.models import ModelEntry, get_model
from tokenmill.plan.placement import Placement, place
from tokenmill.plan.sim_runner import CostModelStepTime, SimRunner, SpecDecodeConfig
from tokenmill.plan.simulate import SimConfig, SimResult, simulate
from tokenmill.plan.step_time import LayoutStepTime
from tokenmill.workload.arrivals import ArrivalSpec
from tokenmill.workload.sharegpt import TextEncoder
from tokenmill.workload.slo import SLO
from tokenmill.workload.spec import parse_workload
from tokenmill.workload.types import Workload


@dataclass(frozen=True)
class PlanRequest:
    model: str
    hardware: str
    workload: str = "fixed:in=1000,out=1000"
    concurrency: int | None = None
    rate: float | None = None
    burstiness: float = 1.0
    # Per replica. Closed loop: requests run (default 4 x its users, at least 64); open loop:
    # requests measured in the steady state (default 256).
    num_prompts: int | None = None
    precision: Precision = field(default_factory=Precision)
    chips: int | None = None  # per replica; None: the fewest that fit
    tp: int | None = None
    replicas: int = 1
    slo: SLO | None = None
    # Latency promises (engine/slo_admission.py): the engine's policy for a request its
    # predictor says cannot meet `slo` (reject | queue | best-effort); off: no admission control.
    slo_policy: str = "off"
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
        SchedulerConfig(slo_policy=self.slo_policy)  # the engine's own check of the name
        if self.slo_policy != "off" and self.slo is None:
            raise ConfigError(f"--slo-policy {self.slo_policy} needs --slo: the targets to promise")


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
    scale: float = 1.0  # the deployment's traffic / the simulated replica's

    @property
    def output_tok_s(self) -> float:
        """Output tokens per second of the whole deployment."""
        return self.metrics.output_tok_s * self.scale

    @property
    def input_tok_s(self) -> float:
        return self.metrics.input_tok_s * self.scale


def sample_size(req: PlanRequest) -> int:
    """Requests whose lengths any replica count of `req` draws from (a prefix of them)."""
    if req.rate is not None:
        return max_open_requests(req.num_prompts, req.max_num_seqs)
    return req.num_prompts or max(4 * req.concurrency, MIN_CLOSED_PROMPTS)


def build_sample(
    req: PlanRequest, tokenizer_loader: Callable[[], TextEncoder] | None = None
) -> Workload:
    """The request lengths of `req` (one sample, shared by every hardware and replica count)."""
    spec = parse_workload(req.workload)
    tokenizer = None
    if spec.needs_tokenizer:
        if tokenizer_loader is None:
            raise ConfigError("the ShareGPT workload needs a tokenizer")
        tokenizer = tokenizer_loader()
    return length_sample(spec, sample_size(req), tokenizer, req.seed)


@dataclass(frozen=True)
class _Prepared:
    placement: Placement
    load: ReplicaLoad
    notes: tuple[str, ...]


def _prepare(req: PlanRequest, model: ModelEntry, hw: HardwareSpec, sample: Workload) -> _Prepared:
    """The replica's load and a placement holding KV for what can be in flight on it."""
    spec, arch = parse_workload(req.workload), model.arch
    longest, mean_len = sample.max_seq_len, math.ceil(sample.mean_seq_len)
    users = replica_users(req.concurrency, req.replicas)
    if req.rate is None:
        load = closed_loop(sample, spec, req.concurrency, req.replicas, req.num_prompts)
        inflight = min(users, load.workload.num_requests, req.max_num_seqs)
    else:
        first = place(arch, hw, req.precision, longest, req.chips, req.tp, min_kv_tokens=longest)
        n = len(sample.requests)
        mean_in = sum(r.prompt_len for r in sample.requests) / n
        inflight = estimate_inflight(
            LayoutStepTime(arch, hw, req.precision, first), req.rate / req.replicas, mean_in,
            sample.mean_seq_len - mean_in, min(req.max_num_seqs, users or req.max_num_seqs),
        )  # fmt: skip
        arrivals = ArrivalSpec(req.rate, req.burstiness, req.concurrency)
        num = num_open_measured(req.num_prompts, inflight)
        load = open_loop(sample, spec, arrivals, req.replicas, num, inflight, req.seed)
    seqs = req.kv_seqs or inflight
    placement = place(
        arch, hw, req.precision, seqs * mean_len, req.chips, req.tp, req.replicas, model.name,
        min_kv_tokens=longest if req.chips else None,
    )  # fmt: skip
    notes = [f"KV sized for {seqs} sequences of {mean_len} tokens (the most that can be in flight)"]
    fit = placement.kv_capacity_tokens // mean_len
    if fit < seqs:
        notes.append(
            f"the KV cache holds {fit} of the {seqs} sequences that can be in flight on "
            f"{placement.chips_per_replica} chips; the engine queues the rest"
        )
    return _Prepared(placement, load, tuple(notes))


def run_plan(
    req: PlanRequest,
    tokenizer_loader: Callable[[], TextEncoder] | None = None,
    sample: Workload | None = None,
) -> PlanResult:
    """Place, simulate and price `req`. `tokenizer_loader` is called only for ShareGPT;
    `sample` (from build_sample) saves drawing the lengths again."""
    model, hw = get_model(req.model), get_hardware(req.hardware)
    sample = sample or build_sample(req, tokenizer_loader)
    while True:
        prep = _prepare(req, model, hw, sample)
        load = prep.load
        result, wall = _simulate(req, model, hw, prep.placement, load)
        metrics = summarize(
            result, req.slo, range(load.num_warmup, load.measured_end), load.window_s,
            _nominal(req, sample) if load.window_s else None,
        )  # fmt: skip
        longer = _longer_sample(req, load, metrics)
        if longer is None:
            break
        req = dataclasses.replace(req, num_prompts=longer)
        if len(sample.requests) < sample_size(req):
            sample = build_sample(req, tokenizer_loader)
    busy = result.prefill_time_s + result.decode_time_s
    econ = economics(
        metrics,
        hw,
        prep.placement.num_chips,
        load.scale,
        result.prefill_time_s / busy if busy else 0,
    )
    notes = list(prep.notes)
    if hw.name == THIS_MACHINE and not hw.calibrated:
        notes.append("this-machine is an UNCALIBRATED default; calibrate it for real predictions")
    if metrics.num_preemptions:
        notes.append(f"{metrics.num_preemptions} preemptions: the KV cache ran short")
    if metrics.is_overloaded:
        notes.append(
            f"OVERLOADED: it produces {metrics.output_tok_s * load.scale:,.0f} of the "
            f"{metrics.offered_tok_s * load.scale:,.0f} output tok/s offered; the queue grows"
        )
    return PlanResult(
        req, model, hw, prep.placement, metrics, econ, load.workload.description, tuple(notes),
        result.num_steps, wall, load.scale,
    )  # fmt: skip


def _longer_sample(req: PlanRequest, load: ReplicaLoad, metrics: SimMetrics) -> int | None:
    """A rate's measured window must span MIN_PERIODS request lifetimes (median E2E) to tell a
    deployment that keeps up from one whose queue grows; None when it does, when the queue is
    already seen growing, or at the largest sample."""
    if load.window_s is None or metrics.is_overloaded or load.num_measured >= MAX_OPEN_SAMPLE:
        return None
    window = load.window_s[1] - load.window_s[0]
    need = MIN_PERIODS * metrics.e2e.median
    if window >= need:
        return None
    return min(MAX_OPEN_SAMPLE, math.ceil(load.num_measured * need / max(window, 1e-9)))


def _nominal(req: PlanRequest, sample: Workload) -> tuple[float, float]:
    """(input, output) tokens/s one replica is offered on average."""
    n, rate = len(sample.requests), req.rate / req.replicas
    mean_in = sum(r.prompt_len for r in sample.requests) / n
    return rate * mean_in, rate * (sample.mean_seq_len - mean_in)


def _simulate(
    req: PlanRequest, model: ModelEntry, hw: HardwareSpec, placement: Placement, load: ReplicaLoad
) -> tuple[SimResult, float]:
    step_model = LayoutStepTime(model.arch, hw, req.precision, placement)
    runner = SimRunner(
        CostModelStepTime(step_model, req.spec),
        jitter_cv=hw.profile.step_jitter_cv if req.jitter else 0.0,
        seed=req.seed,
        acceptance_rate=req.spec,
    )
    bs = req.block_size
    # Blocks past what every request of the run holds at once change no decision (no prefix
    # caching): leaving them out keeps the block pool small on large placements.
    needed = sum(-(-(r.prompt_len + r.output_len) // bs) for r in load.workload.requests)
    config = SimConfig(
        num_blocks=min(placement.kv_capacity_tokens // bs, needed + 1),
        max_model_len=model.arch.max_position_embeddings,
        block_size=req.block_size,
        scheduler=SchedulerConfig(
            max_num_seqs=req.max_num_seqs,
            max_num_batched_tokens=req.max_num_batched_tokens,
            slo_policy=req.slo_policy,
        ),
        spec=req.spec,
        slo=req.slo if req.slo_policy != "off" else None,
    )
    start = time.perf_counter()
    result = simulate(load.workload, runner, config, until=load.measured_end)
    return result, time.perf_counter() - start
