"""`tokenmill bench soak`: hold a server at saturation for a long time and watch its memory.

    0 ........ warm-up ........ |........ measured .........| grace | drain
    RSS sampled every --sample-seconds  (phase "run")         "grace"  "drain"
                                 ^ slope: least squares over the measured "run" samples

N client loops (soak_clients.py) send chat requests back to back, a fraction of them leaving
early. Every sample reads the server's VmRSS, RssAnon and thread count from /proc/<pid>/status
(psutil where /proc is missing) and its /metrics gauges. When the time is up the clients stop
starting requests, those still in flight get --grace-seconds to finish and are then cancelled
(their connections close), and the server has --drain-seconds to bring running, waiting and KV
usage back to 0. Pass: the RSS slope after warm-up is at most --max-slope MB/min, no request
failed and the gauges came back to 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from tokenmill.bench.soak_clients import ClientMix, SoakCounts, client_loop, make_client
from tokenmill.errors import ConfigError

GAUGES = {
    "num_running": "tokenmill:num_requests_running",
    "num_waiting": "tokenmill:num_requests_waiting",
    "kv_usage": "tokenmill:kv_cache_usage_perc",
}
IDLE_POLL_S = 0.5


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 60.0
    warmup_minutes: float = 5.0
    concurrency: int = 48
    sample_s: float = 10.0
    max_slope_mb_per_min: float = 0.1
    grace_s: float = 30.0
    drain_s: float = 60.0
    mix: ClientMix = ClientMix()


@dataclass
class ProcessMemory:
    rss_mb: float
    rss_anon_mb: float
    num_threads: int
    num_mappings: int  # lines of /proc/<pid>/maps: a growing count is mmap'd memory kept


@dataclass
class SoakSample:
    t_s: float  # from the start of the clients
    phase: str  # "run" | "grace" (clients stopping) | "drain" (after they stopped)
    rss_mb: float
    rss_anon_mb: float
    num_threads: int
    num_mappings: int
    num_running: float
    num_waiting: float
    kv_usage: float
    num_ok: int
    num_errors: int
    num_disconnects: int


@dataclass
class SoakSummary:
    minutes: float
    warmup_minutes: float
    concurrency: int
    num_samples: int
    rss_start_mb: float
    rss_after_warmup_mb: float
    rss_end_mb: float  # the last sample under load
    rss_after_drain_mb: float
    rss_peak_mb: float
    slope_mb_per_min: float | None
    anon_slope_mb_per_min: float | None
    max_slope_mb_per_min: float
    threads_start: int
    threads_end: int
    mappings_start: int
    mappings_end: int
    counts: dict
    is_idle_after: bool
    server_process_metrics: dict = field(default_factory=dict)

    @property
    def is_slope_met(self) -> bool:
        return (
            self.slope_mb_per_min is not None and self.slope_mb_per_min <= self.max_slope_mb_per_min
        )

    @property
    def is_pass(self) -> bool:
        return self.is_slope_met and self.counts["num_errors"] == 0 and self.is_idle_after


def read_process_memory(pid: int) -> ProcessMemory:
    """RSS, anonymous RSS (heap and allocator arenas, not mapped weights), threads and memory
    mappings of process `pid`, from /proc; psutil (RSS and threads) where there is no /proc."""
    if not os.path.exists("/proc/self/status"):
        return _psutil_memory(pid)
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/maps") as f:
            num_mappings = sum(1 for _ in f)
    except OSError as exc:
        raise ConfigError(f"cannot read the memory of pid {pid}: {exc}") from exc
    rss_kb = float(fields["VmRSS"].split()[0])
    anon_kb = float(fields["RssAnon"].split()[0]) if "RssAnon" in fields else rss_kb
    return ProcessMemory(rss_kb / 1024, anon_kb / 1024, int(fields["Threads"]), num_mappings)


def _psutil_memory(pid: int) -> ProcessMemory:
    try:
        import psutil
    except ImportError as exc:
        raise ConfigError(f"cannot read the memory of pid {pid}: no /proc, no psutil") from exc
    try:
        proc = psutil.Process(pid)
        return ProcessMemory(proc.memory_info().rss / 2**20, float("nan"), proc.num_threads(), -1)
    except psutil.Error as exc:
        raise ConfigError(f"cannot read the memory of pid {pid}: {exc}") from exc


def parse_gauges(text: str) -> dict[str, float]:
    """The engine gauges of a /metrics text (NaN where absent)."""
    values = {}
    for key, name in GAUGES.items():
        match = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
        values[key] = float(match.group(1)) if match else float("nan")
    return values


def parse_process_metrics(text: str) -> dict[str, float]:
    """Prometheus' process_* collectors (resident memory, fds, CPU), where the server has them."""
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(process_\w+)(?:\{[^}]*\})? (\S+)$", text, re.M)
    }


def fit_slope_per_min(points: Sequence[tuple[float, float]], from_s: float) -> float | None:
    """Least-squares slope, per minute, of (t seconds, y) over the points with t >= `from_s`;
    None with fewer than two distinct times."""
    kept = [(t, y) for t, y in points if t >= from_s]
    if len(kept) < 2:
        return None
    mean_t = sum(t for t, _ in kept) / len(kept)
    mean_y = sum(y for _, y in kept) / len(kept)
    sxx = sum((t - mean_t) ** 2 for t, _ in kept)
    if sxx == 0:
        return None
    sxy = sum((t - mean_t) * (y - mean_y) for t, y in kept)
    return sxy / sxx * 60.0


def summarize(
    samples: Sequence[SoakSample], counts: SoakCounts, cfg: SoakConfig, is_idle_after: bool,
    process_metrics: dict | None = None,
) -> SoakSummary:  # fmt: skip
    """The soak's verdict from its samples: the slopes use the "run" samples after warm-up."""
    run = [s for s in samples if s.phase == "run"]
    if not run:
        raise ConfigError("the soak took no samples under load")
    warmup_s = cfg.warmup_minutes * 60.0
    after_warmup = next((s for s in run if s.t_s >= warmup_s), run[-1])
    counted = asdict(counts)
    counted["num_disconnects"] = counts.num_disconnects
    return SoakSummary(
        minutes=cfg.minutes, warmup_minutes=cfg.warmup_minutes, concurrency=cfg.concurrency,
        num_samples=len(samples), rss_start_mb=run[0].rss_mb,
        rss_after_warmup_mb=after_warmup.rss_mb, rss_end_mb=run[-1].rss_mb,
        rss_after_drain_mb=samples[-1].rss_mb, rss_peak_mb=max(s.rss_mb for s in samples),
        slope_mb_per_min=fit_slope_per_min([(s.t_s, s.rss_mb) for s in run], warmup_s),
        anon_slope_mb_per_min=fit_slope_per_min([(s.t_s, s.rss_anon_mb) for s in run], warmup_s),
        max_slope_mb_per_min=cfg.max_slope_mb_per_min,
        threads_start=run[0].num_threads, threads_end=samples[-1].num_threads,
        mappings_start=run[0].num_mappings, mappings_end=samples[-1].num_mappings,
        counts=counted, is_idle_after=is_idle_after,
        server_process_metrics=dict(process_metrics or {}),
    )  # fmt: skip


class Sampler:
    """Takes a SoakSample of server `pid` (behind `base_url`) with the clients' counts so far."""

    def __init__(self, base_url: str, pid: int, counts: SoakCounts) -> None:
        self.metrics_url = base_url.rstrip("/") + "/metrics"
        self.pid = pid
        self.counts = counts
        self.samples: list[SoakSample] = []
        self.last_metrics = ""
        self.phase = "run"
        self.t0 = time.monotonic()
        self.http = httpx.AsyncClient(timeout=30.0, trust_env=False)

    async def gauges(self) -> dict[str, float]:
        try:
            self.last_metrics = (await self.http.get(self.metrics_url)).text
        except httpx.HTTPError:
            return parse_gauges("")
        return parse_gauges(self.last_metrics)

    async def take(self, phase: str) -> SoakSample:
        gauges = await self.gauges()
        memory = read_process_memory(self.pid)
        c = self.counts
        sample = SoakSample(
            round(time.monotonic() - self.t0, 2), phase, round(memory.rss_mb, 2),
            round(memory.rss_anon_mb, 2), memory.num_threads, memory.num_mappings,
            gauges["num_running"],
            gauges["num_waiting"], gauges["kv_usage"], c.num_ok, c.num_errors, c.num_disconnects,
        )  # fmt: skip
        self.samples.append(sample)
        return sample

    async def every(self, period_s: float, stop: asyncio.Event, report_every_s: float) -> None:
        last_report = -report_every_s
        while not stop.is_set():
            sample = await self.take(self.phase)
            if sample.t_s - last_report >= report_every_s:
                print(format_progress(sample), flush=True)
                last_report = sample.t_s
            next_t = self.t0 + len(self.samples) * period_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_t - time.monotonic()))

    async def wait_idle(self, timeout_s: float) -> bool:
        """Poll until running, waiting and KV usage are all 0; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            g = await self.gauges()
            if g["num_running"] == 0 == g["num_waiting"] and g["kv_usage"] == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(IDLE_POLL_S)


def format_progress(s: SoakSample) -> str:
    return (
        f"t={s.t_s / 60:6.1f} min  rss={s.rss_mb:8.1f} MB  anon={s.rss_anon_mb:8.1f} MB  "
        f"threads={s.num_threads} maps={s.num_mappings}  running={s.num_running:g} waiting={s.num_waiting:g} "
        f"kv={s.kv_usage:.2f}  ok={s.num_ok} errors={s.num_errors} left={s.num_disconnects}"
    )


async def soak_async(
    cfg: SoakConfig, base_url: str, pid: int, model: str, prompts: Sequence[tuple[str, int]]
) -> tuple[SoakSummary, list[SoakSample]]:
    counts = SoakCounts()
    sampler = Sampler(base_url, pid, counts)
    try:
        await _load_and_sample(cfg, sampler, base_url, model, prompts)
        is_idle = await sampler.wait_idle(cfg.drain_s)
        await sampler.take("drain")
    finally:
        await sampler.http.aclose()
    process = parse_process_metrics(sampler.last_metrics)
    return summarize(sampler.samples, counts, cfg, is_idle, process), sampler.samples


async def _load_and_sample(
    cfg: SoakConfig, sampler: Sampler, base_url: str, model: str, prompts
) -> None:
    """The clients for cfg.minutes, sampled; then those in flight get cfg.grace_s to finish."""
    stop_clients, stop_sampler = asyncio.Event(), asyncio.Event()
    async with make_client(cfg.concurrency) as client:
        clients = [
            asyncio.create_task(client_loop(
                client, base_url, model, prompts, cfg.mix, i, sampler.counts, stop_clients
            ))
            for i in range(cfg.concurrency)
        ]  # fmt: skip
        report_every_s = max(cfg.sample_s, 60.0)
        sampling = asyncio.create_task(sampler.every(cfg.sample_s, stop_sampler, report_every_s))
        try:
            await asyncio.wait([sampling, *clients], timeout=cfg.minutes * 60.0,
                               return_when=asyncio.FIRST_EXCEPTION)  # fmt: skip
            stop_clients.set()
            sampler.phase = "grace"
            _, pending = await asyncio.wait(clients, timeout=cfg.grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            stop_sampler.set()
            await sampling  # raises what the sampler raised (the server's process gone)
        finally:
            for task in [sampling, *clients]:
                task.cancel()
    for task in clients:  # a client loop that raised is a bug of the soak, not of the server
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()


def load_prompts(num_prompts: int, tokenizer_model: str | None, seed: int) -> list[tuple[str, int]]:
    """(ShareGPT prompt, reference output length) pairs, lengths in the model's tokens."""
    from tokenmill.bench.serve import open_model_info
    from tokenmill.workload import sample_sharegpt

    tokenizer = open_model_info(tokenizer_model).tokenizer
    return [(r.prompt, r.output_len) for r in sample_sharegpt(tokenizer, num_prompts, seed=seed)]


def write_outputs(out_dir: Path, summary: SoakSummary, samples, config: dict) -> None:
    from tokenmill.bench.machine_load import load_average

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "samples.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(samples[0])))
        writer.writeheader()
        writer.writerows(asdict(s) for s in samples)
    data = {
        "config": config,
        "summary": {**asdict(summary), "is_slope_met": summary.is_slope_met},
        "is_pass": summary.is_pass,
        "machine": {"cpus": os.cpu_count(), "loadavg_1_5_15": load_average()},
    }
    (out_dir / "summary.json").write_text(json.dumps(data, indent=2))


def format_table(s: SoakSummary) -> str:
    def mb(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    c = s.counts
    mark = "met" if s.is_slope_met else "MISSED"
    rows = [
        ("duration", f"{s.minutes:g} min at {s.concurrency} clients, warm-up {s.warmup_minutes:g} min"),
        ("RSS start / after warm-up / end", f"{s.rss_start_mb:.1f} / {s.rss_after_warmup_mb:.1f} / {s.rss_end_mb:.1f} MB"),
        ("RSS after drain / peak", f"{s.rss_after_drain_mb:.1f} / {s.rss_peak_mb:.1f} MB"),
        ("RSS slope after warm-up", f"{mb(s.slope_mb_per_min)} MB/min ({mark}: <= {s.max_slope_mb_per_min:g})"),
        ("anonymous RSS slope", f"{mb(s.anon_slope_mb_per_min)} MB/min"),
        ("server threads / memory mappings", f"{s.threads_start} -> {s.threads_end} / {s.mappings_start} -> {s.mappings_end}"),
        ("requests sent / ok / errors / refused", f"{c['num_sent']} / {c['num_ok']} / {c['num_errors']} / {c['num_refused']}"),
        ("disconnects (left stream / timed out)", f"{c['num_disconnects']} ({c['num_left_stream']} / {c['num_timed_out']})"),
        ("cancelled at the end", str(c["num_cancelled"])),
        ("output tokens", str(c["num_output_tokens"])),
        ("gauges back to 0", "yes" if s.is_idle_after else "NO"),
        ("server process_* metrics", ", ".join(f"{k}={v:g}" for k, v in s.server_process_metrics.items()) or "none exposed"),
    ]  # fmt: skip
    lines = ["| soak | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    lines += [f"error: {e}" for e in c["errors"]]
    lines.append("PASS" if s.is_pass else "FAIL")
    return "\n".join(lines)
