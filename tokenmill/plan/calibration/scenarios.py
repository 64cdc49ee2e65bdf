"""The real engine run through the batch shapes serving produces: prefill chunks, decode
batches at short and long contexts, mixed steps, some scenarios held out of the fit to measure
how well it predicts steps it did not see. Every step is recorded with its scenario and the CPU
time other processes took meanwhile (tokenmill.bench.machine_load); a disturbed scenario is run
again.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenmill.bench.machine_load import cpu_seconds, is_disturbed, load_average, others_cpu_since
from tokenmill.models.arch_config import ArchConfig
from tokenmill.perf.trace import StepRecord

MAX_ATTEMPTS = 3  # runs of a disturbed scenario before its clean steps are all we keep


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
        return [is_disturbed(o, r.wall_time_s) for r, o in zip(self.records, others, strict=True)]


def _engine(settings: CalibrationSettings):
    from tokenmill.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from tokenmill.engine.build import build_engine

    return build_engine(
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
    trace = CalibrationTrace([], [], [], engine.arch, loadavg_before=load_average())

    def run(sc: Scenario):
        engine.step_trace.clear()
        others = _run_scenario(engine, sc, rng, ids)
        steps = list(engine.step_trace)
        wall = sum(r.wall_time_s for r in steps)
        return (steps, others), len(steps), wall, sum(o or 0.0 for o in others)

    for sc, (steps, others) in _run_scenarios(settings, run, trace, progress):
        trace.add(sc, steps, others)
    trace.loadavg_after = load_average()
    return trace


def _record_served(settings: CalibrationSettings, progress, work_dir: Path | None):
    import tempfile

    from tokenmill.bench.serve import open_model_info
    from tokenmill.plan.calibration.served import ServedScenarios

    with tempfile.TemporaryDirectory(prefix="tokenmill-calibrate-") as tmp:
        served = ServedScenarios(settings, Path(work_dir or tmp))
        with served:
            served.run(settings.warmup)  # not recorded: first-use allocations, kernel builds
            trace = CalibrationTrace(
                [], [], [], open_model_info(settings.model).arch, loadavg_before=load_average()
            )

            def run(sc: Scenario):
                r = served.run(sc)
                return r, r.num_steps, r.busy_s, r.others_cpu_s or 0.0

            runs = _run_scenarios(settings, run, trace, progress)
            trace.loadavg_after = load_average()
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
            disturbed = is_disturbed(taken, wall)
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
