"""tokenmill against llama.cpp's llama-server and Hugging Face transformers on this machine.

One interleaved run: each repetition runs every scenario for every engine, the engine order
rotating from one repetition to the next, so a burst of load from elsewhere on the machine hits
all engines alike; the report takes the median over repetitions. Every engine gets the same
weights in the same dtype: by default a BF16 GGUF made from the model with llama-quantize, which
all three load (tokenmill and transformers dequantize nothing; llama.cpp computes in BF16).

Scenarios (a run is a fresh server or process, so no prompt cache carries over):
  offline  N ShareGPT requests at once, output lengths forced: tokenmill LLM.generate,
           transformers static batches, llama-server loaded by the same requests at once
  serve    M ShareGPT requests sent at once to tokenmill serve and llama-server
  tpot     concurrency 1: fixed-length requests one after another, TPOT; plus llama-bench
  engine   `tokenmill bench engine`: decode at batch 1 and large batches vs matmul FLOP/s
  sweep    latency vs request rate and throughput vs concurrency (for the plots)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenmill.bench import report
from tokenmill.bench.llamacpp import LlamaCppBuild, LlamaServer, llama_bench
from tokenmill.bench.machine_load import load_average
from tokenmill.bench.serve import ServeTarget, first_model, run_load
from tokenmill.bench.serve_process import ServeProcess
from tokenmill.workload import ArrivalSpec, Workload, build_workload

log = logging.getLogger(__name__)
SCENARIOS = ("offline", "serve", "tpot", "engine", "sweep")
ENGINES = ("tokenmill", "llama.cpp", "transformers")


@dataclass(frozen=True)
class CompareConfig:
    model: str  # the GGUF every engine loads
    tokenizer_model: str  # GGUF whose tokenizer measures ShareGPT lengths
    results_dir: Path
    dtype: str = "bfloat16"
    # tokenmill's weights: "none" computes on `dtype` floats; "gguf" etc. on packed integers
    # (tokenmill/quant). The engine scenario then measures both in the same run.
    quantization: str = "none"
    repetitions: int = 3
    scenarios: tuple[str, ...] = ("offline", "serve", "tpot", "engine")
    engines: tuple[str, ...] = ENGINES
    offline_prompts: int = 256
    serve_prompts: int = 128
    offline_workload: str = "sharegpt"
    serve_workload: str = "sharegpt"
    tpot_workload: str = "fixed:in=128,out=128"
    tpot_requests: int = 6
    max_num_batched_tokens: int = 2048
    kv_cache_memory_gib: float = 4.0
    ctx_per_slot: int = 2048  # llama-server KV per slot: ShareGPT's longest prompt + output
    max_llama_slots: int = 128  # 128 x 2048 tokens of KV: 6 GB in BF16
    hf_batch_size: int = 64
    # transformers' static batches take several times longer than the others: fewer repetitions
    # keep a run within reach (the report shows how many runs each median has).
    transformers_repetitions: int = 3
    offline_repetitions: int = 3
    engine_batch_sizes: tuple[int, ...] = (1, 64, 128)
    sweep_rates: tuple[float, ...] = (1.0, 2.0, 4.0)
    sweep_concurrency: tuple[int, ...] = (1, 4, 16, 64)
    sweep_workload: str = "sharegpt:out=128"
    sweep_requests: int = 32
    seed: int = 0


@dataclass
class Record:
    scenario: str
    engine: str
    repetition: int
    point: str  # the sweep point ("rate=2", "concurrency=16") or ""
    metrics: dict
    machine: dict = field(default_factory=dict)


def tokenmill_server(model: str, dtype: str, max_num_seqs: int, cfg: CompareConfig) -> ServeProcess:
    """`tokenmill serve` with the comparison's engine settings; its log goes to the results."""
    args = [
        model, "--dtype", dtype, "--max-num-seqs", str(max_num_seqs), "--max-queue", "4096",
        "--max-num-batched-tokens", str(cfg.max_num_batched_tokens),
        "--kv-cache-memory", str(cfg.kv_cache_memory_gib), "--quantization", cfg.quantization,
    ]  # fmt: skip
    return ServeProcess(args, cfg.results_dir / "tokenmill-serve.log")


class Comparison:
    def __init__(self, cfg: CompareConfig, build: LlamaCppBuild | None) -> None:
        self.cfg = cfg
        self.build = build
        self.records: list[Record] = []
        self.tokenizer = None
        self.start_load = 0.0  # 1-minute load average when the current run started
        cfg.results_dir.mkdir(parents=True, exist_ok=True)

    # ---- building blocks ----

    def workload(self, spec: str, num: int, arrivals: ArrivalSpec | None = None) -> Workload:
        if self.tokenizer is None:
            from tokenmill.bench.serve import open_model_info

            self.tokenizer = open_model_info(self.cfg.tokenizer_model).tokenizer
        return build_workload(spec, num, arrivals, tokenizer=self.tokenizer, seed=self.cfg.seed)

    def server(self, engine: str, parallel: int):
        if engine == "tokenmill":
            return tokenmill_server(self.cfg.model, self.cfg.dtype, parallel, self.cfg)
        if self.build is None:
            raise RuntimeError("llama.cpp is not built")
        # One KV stream per slot (llama-server's default with --parallel): with a unified cache
        # every token attends over the used cells of all sequences, masked, which at hundreds of
        # sequences costs far more than each sequence's own context.
        slots = min(parallel, self.cfg.max_llama_slots)
        return LlamaServer(self.build, self.cfg.model, slots, self.cfg.ctx_per_slot)

    def load(self, server, workload: Workload) -> dict:
        target = ServeTarget(server.base_url, first_model(server.base_url))
        run = run_load(target, workload, num_warmup=2, progress=False)
        if any(not r.ok for r in run.results):
            log.warning("failed requests: %s", [r.error for r in run.results if not r.ok][:3])
        return asdict(report.summarize_run(run))

    def add(self, scenario: str, engine: str, rep: int, metrics: dict, point: str = "") -> None:
        machine = {**report.machine_info(), "loadavg_at_start": self.start_load}
        record = Record(scenario, engine, rep, point, metrics, machine)
        self.records.append(record)
        with open(self.cfg.results_dir / "records.jsonl", "a") as f:
            f.write(json.dumps(asdict(record)) + "\n")
        log.info("%s %s rep %d %s: %s", scenario, engine, rep, point, _headline(metrics))

    def offline_subprocess(self, engine: str, workload_spec: str, num: int) -> dict:
        out = self.cfg.results_dir / f"offline-{engine}.tmp.json"
        cmd = [
            sys.executable, "-m", "tokenmill.cli.main", "bench", "offline", self.cfg.model,
            "--engines", engine, "--dtype", self.cfg.dtype, "--workload", workload_spec,
            "--num-prompts", str(num), "--seed", str(self.cfg.seed),
            "--tokenizer", self.cfg.tokenizer_model, "--max-num-seqs", str(num),
            "--max-num-batched-tokens", str(self.cfg.max_num_batched_tokens),
            "--kv-cache-memory", str(self.cfg.kv_cache_memory_gib),
            "--hf-batch-size", str(self.cfg.hf_batch_size), "--no-ceilings", "--no-progress",
            "--json", str(out),
        ]  # fmt: skip
        quiet = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                 "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **quiet})
        result = json.loads(out.read_text())["results"][0]
        out.unlink()
        return result

    # ---- scenarios: one repetition of one engine each ----

    def run_offline(self, engine: str, rep: int) -> None:
        n = self.cfg.offline_prompts
        if engine == "llama.cpp":
            with self.server(engine, n) as server:
                m = self.load(server, self.workload(self.cfg.offline_workload, n))
            metrics = {"output_throughput": m["output_throughput"], "elapsed_s": m["duration_s"],
                       "output_tokens": m["total_output_tokens"], "failed": m["num_failed"]}  # fmt: skip
        else:
            metrics = self.offline_subprocess(engine, self.cfg.offline_workload, n)
        self.add("offline", engine, rep, metrics)

    def run_serve(self, engine: str, rep: int) -> None:
        n = self.cfg.serve_prompts
        with self.server(engine, n) as server:
            workload = self.workload(self.cfg.serve_workload, n)
            self.add("serve", engine, rep, self.load(server, workload))

    def run_tpot(self, engine: str, rep: int) -> None:
        workload = self.workload(
            self.cfg.tpot_workload, self.cfg.tpot_requests, ArrivalSpec(max_concurrency=1)
        )
        with self.server(engine, 1) as server:
            self.add("tpot", engine, rep, self.load(server, workload))
        if engine == "llama.cpp":
            rows = llama_bench(self.build, self.cfg.model, n_prompt=512, n_gen=128, repetitions=3)
            metrics = {f"{'pp' if r['n_prompt'] else 'tg'}_tok_s": r["avg_ts"] for r in rows}
            self.add("llama-bench", engine, rep, metrics)

    def run_engine(self, engine: str, rep: int) -> None:
        out = self.cfg.results_dir / "engine.tmp.json"
        sizes = ",".join(map(str, self.cfg.engine_batch_sizes))
        cmd = [
            sys.executable, "-m", "tokenmill.cli.main", "bench", "engine", self.cfg.model,
            "--dtypes", self.cfg.dtype, "--batch-sizes", sizes, "--gain-requests", "0",
            "--quantizations", ",".join(dict.fromkeys(("none", self.cfg.quantization))),
            "--json", str(out),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        self.add("engine", engine, rep, json.loads(out.read_text()))
        out.unlink()

    def run_sweep(self, engine: str, rep: int) -> None:
        # Each point has its own seed, so points share no prompts a server could have cached.
        cfg = self.cfg
        with self.server(engine, max(cfg.sweep_concurrency)) as server:
            for i, rate in enumerate(cfg.sweep_rates):
                w = self.sweep_workload(cfg.seed + 100 + i, ArrivalSpec(rate), cfg.sweep_requests)
                self.add("sweep-rate", engine, rep, self.load(server, w), f"{rate:g}")
            for i, conc in enumerate(cfg.sweep_concurrency):
                arrivals = ArrivalSpec(max_concurrency=conc)
                w = self.sweep_workload(cfg.seed + 200 + i, arrivals, max(2 * conc, 8))
                self.add("sweep-concurrency", engine, rep, self.load(server, w), str(conc))

    def sweep_workload(self, seed: int, arrivals: ArrivalSpec, num: int) -> Workload:
        self.workload(self.cfg.sweep_workload, 1)  # loads the tokenizer
        spec = self.cfg.sweep_workload
        return build_workload(spec, num, arrivals, tokenizer=self.tokenizer, seed=seed)

    # ---- the run ----

    def scenario_engines(self, scenario: str) -> tuple[str, ...]:
        allowed = {
            "offline": ENGINES, "serve": ("tokenmill", "llama.cpp"),
            "tpot": ("tokenmill", "llama.cpp"), "engine": ("tokenmill",),
            "sweep": ("tokenmill", "llama.cpp"),
        }[scenario]  # fmt: skip
        return tuple(e for e in self.cfg.engines if e in allowed)

    def wanted(self, scenario: str, engine: str, rep: int) -> bool:
        if scenario == "offline" and rep >= self.cfg.offline_repetitions:
            return False
        return engine != "transformers" or rep < self.cfg.transformers_repetitions

    def run(self, progress: Callable[[str], None] = print) -> list[Record]:
        runners = {"offline": self.run_offline, "serve": self.run_serve, "tpot": self.run_tpot,
                   "engine": self.run_engine, "sweep": self.run_sweep}  # fmt: skip
        for rep in range(self.cfg.repetitions):
            for scenario in self.cfg.scenarios:
                engines = tuple(
                    e for e in self.scenario_engines(scenario) if self.wanted(scenario, e, rep)
                )
                shift = rep % max(len(engines), 1)
                for engine in engines[shift:] + engines[:shift]:
                    self.start_load = (load_average() or (float("nan"),))[0]
                    progress(f"[rep {rep + 1}/{self.cfg.repetitions}] {scenario}: {engine} "
                             f"(load {self.start_load:.2f})")  # fmt: skip
                    runners[scenario](engine, rep)
        return self.records


def _headline(metrics: dict) -> str:
    keys = ("output_throughput", "ttft", "tpot", "tg_tok_s", "pp_tok_s")
    parts = []
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, dict):
            parts.append(
                f"{key} median {value.get('median', 0):.1f} p99 {value.get('p99', 0):.1f} ms"
            )
        elif isinstance(value, int | float):
            parts.append(f"{key} {value:.1f}")
    return ", ".join(parts)


def write_report(comp: Comparison, header: str) -> Path:
    """results.md (machine, versions, medians, targets) and the sweep plots."""
    records = [asdict(r) for r in comp.records]
    plots = report.compare_plots(records, comp.cfg.results_dir)
    loads = [r.machine.get("loadavg_at_start", float("nan")) for r in comp.records]
    lines = [
        header,
        f"1-minute load average at the start of each run: min {min(loads, default=0):.2f}, "
        f"median {report._median(loads):.2f}, max {max(loads, default=0):.2f} "
        f"(every run's own value is in records.jsonl)",
        report.compare_markdown(records),
    ]
    lines += [f"\n![{Path(p).stem}]({Path(p).name})" for p in plots]
    path = comp.cfg.results_dir / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path
