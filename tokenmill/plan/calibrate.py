"""Fit "this machine" to the engine's measured step trace.

Each step's FLOPs and bytes come from the same cost model the planner uses, operator by
operator, and the fit finds the profile that best reproduces the measured step times:

    wall_time = per_step + per_request * num_reqs + per_prefill * num_prompt_segments
                + sum over operators of combine(FLOPs / flop_rate, bytes / byte_rate)

(a prompt segment: a request whose prompt, or a chunk of it, runs in the step; on the CPU each
one's attention runs apart from the batched decode, a fixed cost per layer).

The matmuls and element-wise work share one FLOP rate, attention has its own (a CPU's attention
kernels reach a rate unlike its GEMMs'; the profile's attention_unit carries it), and all bytes
move at one bandwidth. `combine` is the sum (no overlap: a linear model, solved by non-negative
least squares) or the max (a roofline: the same solve over which side bounds each operator,
iterated until that stops changing). Both minimise the relative error, so small decode steps
weigh as much as large prefill steps; steps far off the first fit (another process took the CPU)
are dropped and the fit repeated. The fitted profile is written in the catalogue's schema, each
figure's source naming the fit, and predicts exactly what the fit predicts.

The second half runs the real engine through the batch shapes serving produces (prefill chunks,
decode batches at short and long contexts, mixed steps), some scenarios held out of the fit to
measure how well it predicts steps it did not see: `tokenmill plan calibrate`.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from tokenmill.errors import ConfigError
from tokenmill.models.arch_config import ArchConfig
from tokenmill.perf.dtypes import Precision
from tokenmill.perf.step_cost import step_cost
from tokenmill.perf.trace import StepRecord
from tokenmill.plan.hardware import THIS_MACHINE, calibrated_path

_UNBOUNDED = 1e18  # a rate the fit found no cost for
DISTURBED_SHARE = 0.05  # of a core taken by other processes: the measurement is not this machine's
CPU_TICK_SLACK_S = 0.02  # /proc/stat and os.times() count in 10 ms ticks
MAX_ATTEMPTS = 3  # runs of a disturbed scenario before its clean steps are all we keep
_COLUMNS = ("per_step", "per_request", "flops", "attention_flops", "bytes", "per_prefill")
PERF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class CalibrationFit:
    per_step_s: float
    per_request_s: float
    flops_per_s: float  # matmuls and element-wise operators
    bytes_per_s: float
    num_steps: int
    rel_rms_error: float  # of the fitted step times against the measured ones (steps kept)
    median_abs_rel_error: float
    attention_flops_per_s: float = _UNBOUNDED
    overlap: bool = False  # max(compute, memory) per operator instead of their sum
    num_outliers: int = 0  # steps dropped as disturbed
    per_prefill_s: float = 0.0  # per prompt segment in the step

    @property
    def coefficients(self) -> np.ndarray:
        return np.array([
            self.per_step_s, self.per_request_s, _inverse(self.flops_per_s),
            _inverse(self.attention_flops_per_s), _inverse(self.bytes_per_s), self.per_prefill_s,
        ])  # fmt: skip

    def predict(self, features: StepFeatures) -> np.ndarray:
        return features.predict(self.coefficients, self.overlap)


def _inverse(rate: float) -> float:
    return 0.0 if rate >= _UNBOUNDED else 1.0 / rate


@dataclass(frozen=True)
class StepFeatures:
    """Per step (N) and operator (K): FLOPs and bytes (times the layers it runs in)."""

    flops: np.ndarray  # (N, K)
    nbytes: np.ndarray  # (N, K)
    is_attention: np.ndarray  # (K,) bool
    num_reqs: np.ndarray  # (N,)
    wall: np.ndarray  # (N,)
    num_prefill: np.ndarray  # (N,) prompt segments

    @classmethod
    def of(cls, records: Sequence[StepRecord], arch: ArchConfig, precision: Precision):
        flops, nbytes, is_attention, num_prefill = [], [], None, []
        for rec in records:
            shape = rec.batch_shape()
            num_prefill.append(shape.num_prefill_reqs)
            cost = step_cost(arch, shape, precision)
            times = [cost.num_layers if op.per_layer else 1 for op in cost.ops]
            flops.append([op.flops * t for op, t in zip(cost.ops, times, strict=True)])
            nbytes.append([op.total_bytes * t for op, t in zip(cost.ops, times, strict=True)])
            is_attention = is_attention or [op.kind == "attention" for op in cost.ops]
        return cls(
            np.asarray(flops, dtype=float).reshape(len(records), -1),
            np.asarray(nbytes, dtype=float).reshape(len(records), -1),
            np.asarray(is_attention or [], dtype=bool),
            np.asarray([r.num_reqs for r in records], dtype=float),
            np.asarray([r.wall_time_s for r in records], dtype=float),
            np.asarray(num_prefill, dtype=float),
        )

    def subset(self, mask: np.ndarray) -> StepFeatures:
        return replace(
            self, flops=self.flops[mask], nbytes=self.nbytes[mask],
            num_reqs=self.num_reqs[mask], wall=self.wall[mask], num_prefill=self.num_prefill[mask],
        )  # fmt: skip

    def sides(self, coef: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rate = np.where(self.is_attention, coef[3], coef[2])  # (K,)
        return self.flops * rate, self.nbytes * coef[4]  # (N, K) each

    def predict(self, coef: np.ndarray, overlap: bool) -> np.ndarray:
        compute, memory = self.sides(coef)
        ops = np.maximum(compute, memory) if overlap else compute + memory
        return coef[0] + coef[1] * self.num_reqs + coef[5] * self.num_prefill + ops.sum(axis=1)

    def design(self, compute_bound: np.ndarray | None = None) -> np.ndarray:
        """Columns of _COLUMNS; with `compute_bound` (N, K), each operator's FLOPs count only
        where compute bounds it and its bytes only where memory does (the max model)."""
        if compute_bound is None:
            compute_bound = np.ones_like(self.flops, dtype=bool)
            memory_bound = compute_bound
        else:
            memory_bound = ~compute_bound
        flops = self.flops * compute_bound
        return np.stack([
            np.ones_like(self.wall), self.num_reqs, flops[:, ~self.is_attention].sum(axis=1),
            flops[:, self.is_attention].sum(axis=1), (self.nbytes * memory_bound).sum(axis=1),
            self.num_prefill,
        ], axis=1)  # fmt: skip


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients, by trying every active set (6 columns)."""
    best, best_err = np.zeros(a.shape[1]), float("inf")
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            coef, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(coef < 0):
                continue
            full = np.zeros(a.shape[1])
            full[list(cols)] = coef
            err = float(np.sum((a @ full - b) ** 2))
            if err < best_err:
                best, best_err = full, err
    return best


def _solve(feats: StepFeatures, compute_bound: np.ndarray | None) -> np.ndarray:
    a = feats.design(compute_bound)
    # Columns scaled to similar magnitudes so lstsq is well conditioned; rows by 1 / wall.
    scales = np.maximum(np.abs(a).max(axis=0), 1e-30)
    return _nnls(a / scales / feats.wall[:, None], np.ones_like(feats.wall)) / scales


def _rel_errors(feats: StepFeatures, coef: np.ndarray, overlap: bool) -> np.ndarray:
    return feats.predict(coef, overlap) / feats.wall - 1


def _fit_coefficients(feats: StepFeatures, overlap: bool) -> np.ndarray:
    coef = _solve(feats, None)
    if not overlap:
        return coef

    def objective(c: np.ndarray) -> float:
        return float(np.sum(_rel_errors(feats, c, True) ** 2))

    # The max model is piecewise linear: given which side bounds each operator it is the sum
    # model's solve. Iterate that from several guesses of the machine balance (FLOPs per byte
    # where operators turn compute-bound) and keep the best.
    best, best_err = coef, objective(coef)
    inv_flops = coef[2] or 1e-11
    for balance in np.logspace(-1, 3, 9):
        start = coef.copy()
        start[2], start[3], start[4] = inv_flops, coef[3] or inv_flops, inv_flops * balance
        c, pattern = start, None
        for _ in range(20):
            compute, memory = feats.sides(c)
            if pattern is not None and np.array_equal(compute >= memory, pattern):
                break
            pattern = compute >= memory
            c = _solve(feats, pattern)
            err = objective(c)
            if err < best_err:
                best, best_err = c, err
    return best


def _outliers(rel: np.ndarray) -> np.ndarray:
    """Steps whose relative error is far beyond the typical one (disturbed measurements)."""
    spread = 1.4826 * np.median(np.abs(rel - np.median(rel)))
    return np.abs(rel) > max(5 * spread, 0.15)


def fit_features(feats: StepFeatures, overlap: bool = False, trim: bool = True) -> CalibrationFit:
    if len(feats.wall) < 8:
        raise ConfigError(f"calibration needs at least 8 timed steps, got {len(feats.wall)}")
    coef = _fit_coefficients(feats, overlap)
    dropped = np.zeros(len(feats.wall), dtype=bool)
    if trim:
        dropped = _outliers(_rel_errors(feats, coef, overlap))
        if 0 < dropped.sum() <= len(feats.wall) // 4:
            coef = _fit_coefficients(feats.subset(~dropped), overlap)
        else:
            dropped[:] = False
    rel = _rel_errors(feats.subset(~dropped), coef, overlap)
    return CalibrationFit(
        per_step_s=float(coef[0]),
        per_request_s=float(coef[1]),
        flops_per_s=1.0 / coef[2] if coef[2] > 0 else _UNBOUNDED,
        bytes_per_s=1.0 / coef[4] if coef[4] > 0 else _UNBOUNDED,
        num_steps=int((~dropped).sum()),
        rel_rms_error=float(np.sqrt(np.mean(rel**2))),
        median_abs_rel_error=float(np.median(np.abs(rel))),
        attention_flops_per_s=1.0 / coef[3] if coef[3] > 0 else _UNBOUNDED,
        overlap=overlap,
        num_outliers=int(dropped.sum()),
        per_prefill_s=float(coef[5]),
    )


def fit_trace(
    records: Sequence[StepRecord],
    arch: ArchConfig,
    precision: Precision | None = None,
    overlap: bool = False,
    trim: bool = True,
) -> CalibrationFit:
    """Fit step times of `records` (a model `arch` run at `precision`)."""
    records = [r for r in records if r.wall_time_s > 0 and r.num_reqs > 0]
    if len(records) < 8:
        raise ConfigError(f"calibration needs at least 8 timed steps, got {len(records)}")
    feats = StepFeatures.of(records, arch, precision or Precision(weights="fp32"))
    return fit_features(feats, overlap, trim)


@dataclass(frozen=True)
class ErrorSummary:
    """Relative errors of predicted step times: (predicted - measured) / measured."""

    num_steps: int
    median_abs: float
    p90_abs: float
    rms: float
    mean: float  # the bias: > 0 predicts slower than measured

    @classmethod
    def of(cls, rel: np.ndarray) -> ErrorSummary:
        if not len(rel):
            return cls(0, float("nan"), float("nan"), float("nan"), float("nan"))
        a = np.abs(rel)
        return cls(len(rel), float(np.median(a)), float(np.percentile(a, 90)),
                   float(np.sqrt(np.mean(rel**2))), float(np.mean(rel)))  # fmt: skip

    def describe(self) -> str:
        return (
            f"{self.num_steps} steps: median |err| {self.median_abs:.1%}, p90 {self.p90_abs:.1%},"
            f" RMS {self.rms:.1%}, bias {self.mean:+.1%}"
        )


def step_kind(rec: StepRecord) -> str:
    if rec.num_prefill_tokens and rec.num_decode_tokens:
        return "mixed"
    return "prefill" if rec.num_prefill_tokens else "decode"


def evaluate(
    fit: CalibrationFit, records: Sequence[StepRecord], arch: ArchConfig, precision: Precision
) -> dict[str, ErrorSummary]:
    """Errors of `fit` on `records`: all of them and per step kind (prefill, decode, mixed)."""
    feats = StepFeatures.of(records, arch, precision)
    rel = fit.predict(feats) / feats.wall - 1
    kinds = np.asarray([step_kind(r) for r in records])
    out = {"all": ErrorSummary.of(rel)}
    for kind in ("prefill", "decode", "mixed"):
        out[kind] = ErrorSummary.of(rel[kinds == kind])
    return out


def _memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 16e9


def profile_dict(
    fit: CalibrationFit, origin: str, precision: Precision, calibration: dict | None = None
) -> dict:
    """The fitted machine in the hardware catalogue's schema; `calibration` (how it was
    measured: dtype, engine settings, held-out errors) is kept beside it."""
    src = (
        f"[fitted] {fit.num_steps} steps of {origin} ({precision.describe()}), "
        f"{time.strftime('%Y-%m-%d')}, rel. RMS error {fit.rel_rms_error:.1%}"
    )
    peak = {"value": fit.flops_per_s / 1e12, "source": src}
    profile = {
        "name": THIS_MACHINE,
        "display_name": "this machine (calibrated)",
        "aliases": ["local", "here"],
        "kind": "cpu",
        "scheduling": "dynamic",
        "calibrated": True,
        "overlap_compute_memory": fit.overlap,
        "memory": [
            {
                "name": "ram",
                "holds": ["weights", "kv", "activations"],
                "capacity_gb": {"value": _memory_bytes() / 1e9, "source": "[measured] os.sysconf"},
                "bandwidth_gb_s": {"value": fit.bytes_per_s / 1e9, "source": src},
                "efficiency": {"value": 1.0, "source": "folded into the fitted bandwidth"},
            }
        ],
        # Every dtype the cost model may ask for runs at the one fitted rate.
        "compute": {
            **{f"{d}_tflops": peak for d in ("fp32", "bf16", "fp16")},
            "efficiency": {"value": 1.0, "source": "folded into the fitted rate"},
        },
        "runtime": {
            "per_step_overhead_us": {"value": fit.per_step_s * 1e6, "source": src},
            "per_request_overhead_us": {"value": fit.per_request_s * 1e6, "source": src},
            "per_prefill_overhead_us": {"value": fit.per_prefill_s * 1e6, "source": src},
            "per_kernel_overhead_us": {"value": 0.0, "source": "folded into per_step_overhead"},
            "step_jitter_cv": {"value": fit.rel_rms_error, "source": src},
            "usable_memory_fraction": {"value": 0.5, "source": "[guess] leave room for the OS"},
        },
        "links": {
            "scale_up": {
                "bandwidth_gb_s": {"value": 10, "source": "[guess] a single machine"},
                "latency_us": {"value": 10, "source": "[guess] a single machine"},
                "domain_size": {"value": 1, "source": "a single machine"},
            }
        },
        "economics": {
            "price_per_hour_usd": {"value": 0.0, "source": "already owned"},
            "power_w": {"value": 65, "source": "[guess] a desktop-class CPU under load"},
        },
    }
    if fit.attention_flops_per_s < _UNBOUNDED:
        profile["attention_unit"] = {
            "tflops": {"value": fit.attention_flops_per_s / 1e12, "source": src + "; attention"},
            "efficiency": {"value": 1.0, "source": "folded into the fitted rate"},
        }
    if calibration is not None:
        profile["calibration"] = calibration
    return profile


def write_calibration(profile: dict, path: Path | None = None) -> Path:
    path = path or calibrated_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=2) + "\n", encoding="utf-8")
    return path


def read_calibration(path: Path | None = None) -> dict | None:
    """The `calibration` section of the written profile (dtype, engine settings, errors)."""
    path = path or calibrated_path()
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("calibration")


# ---- running the engine through the shapes serving produces ---------------------------------


@dataclass(frozen=True)
class Scenario:
    """`num_reqs` requests of `prompt_len` tokens generating `output_len` each, started
    together: prefill steps (several prompts packed per step), then decode steps at that batch.
    With `late_prompt_len`, one more prompt arrives once they decode: mixed steps."""

    name: str
    num_reqs: int
    prompt_len: int
    output_len: int
    late_prompt_len: int = 0
    holdout: bool = False  # kept out of the fit; its steps measure the prediction error


@dataclass(frozen=True)
class CalibrationSettings:
    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    dtype: str = "float32"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    block_size: int = 16
    kv_cache_memory_gib: float = 1.0
    prefill_lens: tuple[int, ...] = (16, 64, 128, 256, 384, 512, 1024)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    long_prompt_len: int = 400
    long_batch_sizes: tuple[int, ...] = (1, 4, 16, 32, 48)
    decode_steps: int = 10
    mixed: tuple[tuple[int, int], ...] = ((8, 256), (32, 480))  # (decoding requests, late prompt)
    holdout: tuple[Scenario, ...] = (
        Scenario("holdout prefill 700", 1, 700, 1, holdout=True),
        Scenario("holdout decode 24x200", 24, 200, 10, holdout=True),
        Scenario("holdout mixed 16+384", 16, 48, 10, late_prompt_len=384, holdout=True),
    )
    warmup: Scenario = Scenario("warm-up", 4, 64, 4, late_prompt_len=128)  # not recorded
    max_attempts: int = MAX_ATTEMPTS  # runs of a scenario other processes disturbed
    seed: int = 0
    # Through `tokenmill serve` and a streaming client (served traffic's step times), not an
    # engine in this process.
    served: bool = False

    def scenarios(self) -> list[Scenario]:
        out = [Scenario(f"prefill {n}", 1, n, 1) for n in self.prefill_lens for _ in range(2)]
        out += [Scenario(f"decode {b}x32", b, 32, self.decode_steps) for b in self.batch_sizes]
        out += [
            Scenario(f"decode {b}x{self.long_prompt_len}", b, self.long_prompt_len, 6)
            for b in self.long_batch_sizes
        ]
        out += [Scenario(f"mixed {b}+{n}", b, 32, self.decode_steps, n) for b, n in self.mixed]
        # The held-out scenarios are spread among the fitted ones: the speed of a shared machine
        # drifts over a run, and held-out steps all recorded last would measure the drift too.
        fitted, held = len(out), len(self.holdout)
        for i, sc in enumerate(self.holdout):
            out.insert(fitted * (i + 1) // (held + 1) + i, sc)
        return out

    def engine_settings(self) -> dict:
        keys = ("dtype", "max_num_seqs", "max_num_batched_tokens", "block_size")
        return {k: getattr(self, k) for k in keys} | {
            "kv_cache_memory_gib": self.kv_cache_memory_gib,
            "enable_prefix_caching": False,
        }


@dataclass
class CalibrationTrace:
    records: list[StepRecord]
    groups: list[str]  # the scenario each step belongs to
    holdout: list[bool]
    arch: ArchConfig
    # CPU-seconds other processes used during each step (None: not measurable here).
    others_cpu_s: list[float | None] = field(default_factory=list)
    elapsed_s: float = 0.0
    loadavg_before: tuple[float, ...] = ()
    loadavg_after: tuple[float, ...] = ()
    num_retries: int = 0

    def add(self, sc: Scenario, steps: list[StepRecord], others: list[float | None]) -> None:
        self.records += steps
        self.groups += [sc.name] * len(steps)
        self.holdout += [sc.holdout] * len(steps)
        self.others_cpu_s += others

    @property
    def disturbed(self) -> list[bool]:
        """Steps during which other processes took CPU time: with 2 cores and torch's threads
        spin-waiting on each other, even a little of it slows a step several times."""
        others = self.others_cpu_s or [None] * len(self.records)
        return [
            o is not None and o > DISTURBED_SHARE * r.wall_time_s + CPU_TICK_SLACK_S
            for r, o in zip(self.records, others, strict=True)
        ]


def _engine(settings: CalibrationSettings):
    from tokenmill.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from tokenmill.engine.llm_engine import LLMEngine

    return LLMEngine(
        EngineConfig(
            model=ModelConfig(model=settings.model, dtype=settings.dtype),
            cache=CacheConfig(
                block_size=settings.block_size, kv_cache_memory_gib=settings.kv_cache_memory_gib,
                enable_prefix_caching=False,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=settings.max_num_seqs,
                max_num_batched_tokens=settings.max_num_batched_tokens,
            ),
            record_step_trace=True,
        )
    )  # fmt: skip


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU-seconds every process has used, those of this process and its waited children),
    or None where /proc/stat is missing. Steal time counts as used by others."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def others_cpu_since(before: tuple[float, float] | None, extra_own_s: float = 0.0):
    """CPU-seconds other processes used since `before` (`extra_own_s`: ours not counted by
    os.times(), such as a server subprocess still running)."""
    now = cpu_seconds()
    if before is None or now is None:
        return None
    return max(0.0, (now[0] - before[0]) - (now[1] - before[1]) - extra_own_s)


def _run_scenario(engine, sc: Scenario, rng: random.Random, ids) -> list[float | None]:
    """Run one scenario; returns the other processes' CPU-seconds during each recorded step."""
    from tokenmill.sampling_params import SamplingParams

    def add(prompt_len: int, output_len: int) -> str:
        req_id = f"cal-{next(ids)}"
        prompt = [rng.randrange(1000, 30000) for _ in range(prompt_len)]
        # Greedy, as `tokenmill bench serve` samples by default: the same work per step as the
        # serving runs the calibration is validated against.
        params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
        engine.add_request(req_id, prompt, params)
        return req_id

    first = {add(sc.prompt_len, sc.output_len) for _ in range(sc.num_reqs)}
    unstarted, late, others = set(first), None, []
    while engine.has_unfinished_requests():
        num_recorded, before = len(engine.step_trace), cpu_seconds()
        outputs = engine.step()
        if len(engine.step_trace) > num_recorded:
            others.append(others_cpu_since(before))
        unstarted -= {o.request_id for o in outputs}
        first -= {o.request_id for o in outputs if o.finished}
        if late is not None and any(o.request_id == late for o in outputs):
            late = None
        # While the first requests decode, one late prompt is always being prefilled.
        if sc.late_prompt_len and not unstarted and first and late is None:
            late = add(sc.late_prompt_len, 1)
    return others


def record_calibration_trace(
    settings: CalibrationSettings, progress=None, work_dir: Path | None = None
) -> CalibrationTrace:
    """Run the real engine through `settings.scenarios()` (in this process, or with
    `settings.served` through `tokenmill serve` and a streaming client, its logs and step trace
    in `work_dir`); every step recorded and labelled with its scenario and the CPU time other
    processes took meanwhile. A scenario disturbed by them is run again, up to
    `settings.max_attempts` times in all."""
    if settings.served:
        return _record_served(settings, progress, work_dir)
    engine = _engine(settings)
    rng, ids = random.Random(settings.seed), itertools.count()
    # Warm-up, not recorded: first-use allocations and kernel builds.
    _run_scenario(engine, settings.warmup, rng, ids)
    trace = CalibrationTrace([], [], [], engine.arch, loadavg_before=_loadavg())

    def run(sc: Scenario):
        engine.step_trace.clear()
        others = _run_scenario(engine, sc, rng, ids)
        steps = list(engine.step_trace)
        wall = sum(r.wall_time_s for r in steps)
        return (steps, others), len(steps), wall, sum(o or 0.0 for o in others)

    for sc, (steps, others) in _run_scenarios(settings, run, trace, progress):
        trace.add(sc, steps, others)
    trace.loadavg_after = _loadavg()
    return trace


def _record_served(settings: CalibrationSettings, progress, work_dir: Path | None):
    import tempfile

    from tokenmill.bench.serve import open_model_info
    from tokenmill.plan.calibrate_served import ServedScenarios

    with tempfile.TemporaryDirectory(prefix="tokenmill-calibrate-") as tmp:
        served = ServedScenarios(settings, Path(work_dir or tmp))
        with served:
            served.run(settings.warmup)  # not recorded: first-use allocations, kernel builds
            trace = CalibrationTrace(
                [], [], [], open_model_info(settings.model).arch, loadavg_before=_loadavg()
            )

            def run(sc: Scenario):
                r = served.run(sc)
                return r, r.num_steps, r.busy_s, r.others_cpu_s or 0.0

            runs = _run_scenarios(settings, run, trace, progress)
            trace.loadavg_after = _loadavg()
        for sc, r in runs:  # the server writes its step trace as it stops
            steps = served.records(r)
            # Other processes' CPU time is known per scenario: spread over its steps by time.
            share = None if r.others_cpu_s is None else r.others_cpu_s / max(r.busy_s, 1e-9)
            trace.add(sc, steps, [None if share is None else share * s.wall_time_s for s in steps])
    return trace


def _run_scenarios(settings: CalibrationSettings, run, trace: CalibrationTrace, progress):
    """Every scenario through `run` (-> result, steps, their seconds, other processes'
    CPU-seconds meanwhile), again while other processes disturb it; [(scenario, result)]."""
    out = []
    start = time.perf_counter()
    for sc in settings.scenarios():
        for attempt in range(1, settings.max_attempts + 1):
            result, num_steps, wall, taken = run(sc)
            disturbed = taken > DISTURBED_SHARE * wall + CPU_TICK_SLACK_S
            if progress is not None:
                share = taken / wall if wall > 0 else 0.0
                note = f", other processes took {share:.0%} of a core" if disturbed else ""
                progress(f"{sc.name}: {num_steps} steps in {wall:.1f} s{note}")
            if not disturbed or attempt == settings.max_attempts:
                break
            trace.num_retries += 1
        out.append((sc, result))
    trace.elapsed_s = time.perf_counter() - start
    return out


def _loadavg() -> tuple[float, ...]:
    return tuple(round(x, 2) for x in os.getloadavg()) if hasattr(os, "getloadavg") else ()


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
    precision = Precision(weights=PERF_DTYPE[settings.dtype])
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
