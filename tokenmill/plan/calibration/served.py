"""Calibration scenarios sent to `tokenmill serve` as streamed requests.

On a machine whose cores also stream the tokens, a served step is slower than the same step run
in-process: the server's event loop (SSE chunks) and the client (parsing them) take CPU from the
engine's threads. So `tokenmill plan calibrate --served` fits the step times the server itself
records (`--step-trace`) while the scenarios arrive over HTTP, streamed as `tokenmill bench serve`
streams them. Each scenario's steps are found by the server's step counter
(`tokenmill:engine_steps_total`, one per trace record) before and after it. Requests arrive one
by one, so a scenario's steps are less regular than in-process (a batch may start before all of
its prompts arrived) and short scenarios carry the requests' start and end work: the fit is
noisier (docs/planner.md, `tokenmill plan calibrate`, gives both held-out errors), which is why
the in-process engine stays the default and the validation's speed probe (served requests)
carries the serving overhead instead.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

from tokenmill.bench.machine_load import cpu_seconds, others_cpu_since
from tokenmill.bench.serve import ServeTarget, first_model, make_client, send_request
from tokenmill.bench.serve_process import ServeProcess
from tokenmill.errors import ConfigError
from tokenmill.perf.trace import StepRecord, read_trace
from tokenmill.workload import WorkloadRequest

# Prompt seeds far from the validation workloads' request indices, so no prompt repeats.
_FIRST_PROMPT_SEED = 10_000_000


@dataclass(frozen=True)
class ServedRun:
    """One scenario's span of the server's steps."""

    first_step: int
    num_steps: int
    busy_s: float  # summed step time (the server's counter)
    others_cpu_s: float | None  # CPU-seconds of processes other than the server and this one


def engine_serve_args(settings) -> list[str]:
    """`tokenmill serve` arguments for the engine settings both calibration and validation
    carry (model, dtype, batch limits, block size, KV memory; prefix caching off)."""
    args = [
        "--dtype", settings.dtype, "--max-num-seqs", str(settings.max_num_seqs),
        "--max-num-batched-tokens", str(settings.max_num_batched_tokens),
        "--block-size", str(settings.block_size),
        "--kv-cache-memory", str(settings.kv_cache_memory_gib), "--no-prefix-caching",
    ]  # fmt: skip
    return ([settings.model] if settings.model else []) + args


class ServedScenarios:
    """`with ServedScenarios(settings, work_dir) as served:` `served.run(scenario)` per
    scenario; after the block, `served.records(run)` are the server's steps of that run."""

    def __init__(self, settings, work_dir: Path) -> None:
        self.trace_path = Path(work_dir) / "calibration-serve-trace.jsonl"
        args = [*engine_serve_args(settings), "--step-trace", str(self.trace_path)]
        self._server = ServeProcess(args, Path(work_dir) / "calibration-serve.log")
        self._seeds = itertools.count(_FIRST_PROMPT_SEED + 1000 * settings.seed)
        self._target: ServeTarget | None = None
        self._trace: list[StepRecord] | None = None

    def __enter__(self) -> ServedScenarios:
        self._server.__enter__()
        url = self._server.base_url
        self._target = ServeTarget(url, first_model(url))
        return self

    def __exit__(self, *exc) -> None:
        self._server.__exit__(*exc)

    def run(self, sc) -> ServedRun:
        steps0, busy0, *_ = self._server.engine_counters()
        cpu0, server0 = cpu_seconds(), self._server.cpu_seconds()
        asyncio.run(self._send(sc))
        others = others_cpu_since(cpu0, self._server.cpu_seconds() - server0)
        steps1, busy1, *_ = self._server.engine_counters()
        return ServedRun(int(steps0), int(steps1 - steps0), busy1 - busy0, others)

    async def _send(self, sc) -> None:
        """`sc.num_reqs` requests at once; with `sc.late_prompt_len`, once all of them stream,
        one late prompt after another until they finish (mixed steps)."""
        target = self._target
        async with make_client(target, sc.num_reqs + 1) as client:

            async def send(prompt_len: int, output_len: int, started=None) -> None:
                req = WorkloadRequest(None, prompt_len, output_len)
                seed = next(self._seeds)
                result = await send_request(client, target, req, seed, time.perf_counter(), started)
                if not result.ok:
                    raise ConfigError(f"calibration request failed: {result.error}")

            started = [asyncio.Event() for _ in range(sc.num_reqs)]
            tasks = [asyncio.create_task(send(sc.prompt_len, sc.output_len, s)) for s in started]
            try:
                if sc.late_prompt_len:
                    for event in started:
                        await event.wait()
                    while not all(t.done() for t in tasks):
                        await send(sc.late_prompt_len, 1)
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()

    def records(self, run: ServedRun) -> list[StepRecord]:
        """The server's steps of `run` (readable once the server has stopped)."""
        if self._trace is None:
            if not self.trace_path.exists():
                raise ConfigError(f"the server wrote no step trace ({self.trace_path})")
            self._trace = read_trace(self.trace_path)
        steps = self._trace[run.first_step : run.first_step + run.num_steps]
        if len(steps) != run.num_steps:
            raise ConfigError(
                f"the server's step trace has {len(self._trace)} steps; a scenario counted "
                f"steps {run.first_step}..{run.first_step + run.num_steps}"
            )
        return steps
