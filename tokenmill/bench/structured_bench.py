"""Structured outputs against unconstrained requests: time per output token, same server, same run.

    python -m tokenmill.bench.structured_bench --out results/structured [-- --quantization gguf]

One tokenmill server (the bundled model unless a model is among the server arguments after
`--`). Rounds alternate, structured first (S P S P ...): each round sends `--requests` chat
requests, `--concurrency` at a time (closed loop: a finished request is replaced at once, so
the batch stays full), the same prompts in every round.

    structured   response_format json_schema, a different schema per request (the seeded
                 generator of tokenmill.structured.schema_gen), greedy, up to the grammar's end
                 or --max-tokens. Every round sends the same schemas (as an application sends
                 its schemas again): round 0 compiles them, later rounds find them cached.
                 `--new-schemas` draws new ones every round instead (every request compiles)
    plain        no constraint, greedy, `ignore_eos`, max_tokens = the output length the
                 structured request of the same index got in the round before: both kinds
                 decode the same number of tokens at the same batch size

Per request TPOT = (e2e - TTFT) / (output tokens - 1) on the client's clock; per round the
server's mean step time (from /metrics: engine step seconds / engine steps). The claim checked:
median TPOT structured / plain <= 1.10 over the rounds after the first (grammars cached; the
compile is reported on its own, below); all rounds pooled are reported beside it.

Grammar compile time per new schema, two ways: in this process, the compiler the server runs on
its worker thread, with the same tokenizer (compile, cache hit, a new request's first mask);
and on the idle server, a new schema's request (max_tokens 1) against the same schema again,
whose TTFT difference is what compiling cost the request (noisy on a busy machine). A table on
stdout, JSON in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from tokenmill.bench.machine_load import describe_load, load_average
from tokenmill.bench.serve import (
    RequestResult,
    ServeTarget,
    _read_stream,
    make_client,
    open_model_info,
)
from tokenmill.bench.serve_process import ServeProcess
from tokenmill.structured.schema_gen import random_schema

PROMPT = "Record {i}: fill in the JSON for an item of a shop's catalogue."
TARGET_RATIO = 1.10


@dataclass
class RoundResult:
    kind: str  # structured | plain
    index: int
    duration_s: float
    tpot_ms: list[float] = field(default_factory=list)
    output_lens: list[int] = field(default_factory=list)
    num_finished_stop: int = 0  # structured: replies the grammar ended (the rest hit max_tokens)
    num_failed: int = 0
    step_ms: float = float("nan")  # the server's mean engine step over the round
    num_steps: int = 0
    errors: list[str] = field(default_factory=list)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}


def chat_payload(model: str, i: int, max_tokens: int, schema: dict | None) -> dict:
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT.format(i=i)}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if schema is None:
        payload["ignore_eos"] = True
    else:
        payload["response_format"] = schema_format(schema)
    return payload


async def stream_chat(client: httpx.AsyncClient, url: str, payload: dict) -> RequestResult:
    """One streamed chat completion, timed (serve.py's stream reader); never raises."""
    result = RequestResult(False, 0, 0, payload["max_tokens"])
    sent = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            if not await _read_stream(response, result, "chat", sent, None):
                return result
        result.latency_s = time.perf_counter() - sent
        result.ok = result.num_chunks > 0
        result.error = "" if result.ok else "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_round(
    client: httpx.AsyncClient, target: ServeTarget, payloads: list[dict], concurrency: int
) -> tuple[list[RequestResult], float]:
    url = target.base_url + "/v1/chat/completions"
    semaphore = asyncio.Semaphore(concurrency)

    async def one(payload: dict) -> RequestResult:
        async with semaphore:
            return await stream_chat(client, url, payload)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in payloads))
    return list(results), time.perf_counter() - t0


def summarize(kind: str, index: int, results: list[RequestResult], duration_s: float):
    out = RoundResult(kind, index, duration_s)
    for r in results:
        if not r.ok:
            out.num_failed += 1
            out.errors.append(r.error)
            continue
        out.output_lens.append(r.output_len)
        out.num_finished_stop += r.output_len < r.expected_output_len
        if r.tpot_s is not None:
            out.tpot_ms.append(r.tpot_s * 1e3)
    out.errors = out.errors[:3]
    return out


async def tpot_rounds(server: ServeProcess, target: ServeTarget, args) -> list[RoundResult]:
    rng = random.Random(args.seed)
    rounds: list[RoundResult] = []
    async with make_client(target, args.concurrency + 4) as client:
        lens = [args.max_tokens] * args.requests
        for index in range(args.rounds):
            for kind in ("structured", "plain"):
                if kind == "structured":
                    if not args.new_schemas:
                        rng = random.Random(args.seed)  # the same schemas as round 0
                    payloads = [
                        chat_payload(target.model, i, args.max_tokens, random_schema(rng))
                        for i in range(args.requests)
                    ]
                else:  # the structured round's lengths, so both decode the same tokens
                    payloads = [
                        chat_payload(target.model, i, max(n, 2), None) for i, n in enumerate(lens)
                    ]
                steps0, step_s0, _, _ = server.engine_counters()
                results, duration = await run_round(client, target, payloads, args.concurrency)
                steps1, step_s1, _, _ = server.engine_counters()
                row = summarize(kind, index, results, duration)
                row.num_steps = int(steps1 - steps0)
                row.step_ms = (step_s1 - step_s0) / max(row.num_steps, 1) * 1e3
                if kind == "structured":
                    lens = [r.output_len if r.ok else args.max_tokens for r in results]
                rounds.append(row)
                print(f"  {kind:10s} round {index}: {duration:6.1f} s, TPOT p50 "
                      f"{_median(row.tpot_ms):6.2f} ms, step {row.step_ms:6.2f} ms, "
                      f"load {describe_load()}", flush=True)  # fmt: skip
    return rounds


async def compile_probes(target: ServeTarget, num: int, seed: int) -> dict:
    """TTFT of a new schema's request and of the same schema again (a cache hit), one at a
    time on the idle server: their difference is the compile a new schema costs."""
    rng = random.Random(seed)
    url = target.base_url + "/v1/chat/completions"
    first_ms, hit_ms = [], []
    async with make_client(target, 2) as client:
        for i in range(num):
            schema = random_schema(rng)
            for out in (first_ms, hit_ms):
                r = await stream_chat(client, url, chat_payload(target.model, i, 1, schema))
                if not r.ok:
                    raise RuntimeError(f"compile probe failed: {r.error}")
                out.append(r.ttft_s * 1e3)
    diff_ms = [a - b for a, b in zip(first_ms, hit_ms, strict=True)]
    return {
        "num_schemas": num,
        "first_use_ttft_ms": _dist(first_ms),
        "cache_hit_ttft_ms": _dist(hit_ms),
        "server_compile_ms": _dist(diff_ms),
    }


def compile_timings(model: str | None, num: int, seed: int) -> dict:
    """What the server's worker thread does per schema, timed in this process with the same
    tokenizer: compile a new schema, compile it again (a cache hit), then a request's first
    mask from it (llguidance builds lexer states lazily: part of the cost lands here)."""
    from tokenmill.structured.compiler import GrammarCompiler
    from tokenmill.structured.grammar import Grammar
    from tokenmill.structured.masks import fill_bitmask

    compiler = GrammarCompiler(open_model_info(model).tokenizer)
    compiler.ll_tokenizer()  # once per server, at its first structured request
    rng = random.Random(seed)
    new_ms, hit_ms, mask_ms = [], [], []
    for _ in range(num):
        grammar = Grammar.json_schema(random_schema(rng))
        for out in (new_ms, hit_ms):
            t0 = time.perf_counter()
            compiled = compiler.compile(grammar)
            out.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        fill_bitmask([compiled.compiled.new_matcher()], [()])
        mask_ms.append((time.perf_counter() - t0) * 1e3)
    return {
        "num_schemas": num,
        "compile_ms": _dist(new_ms),
        "cache_hit_ms": _dist(hit_ms),
        "first_mask_ms": _dist(mask_ms),
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _dist(values: list[float]) -> dict:
    return {
        "median": _median(values),
        "p90": _pct(values, 0.9),
        "max": max(values, default=float("nan")),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


def compare(rounds: list[RoundResult]) -> dict:
    """Both kinds' TPOT over the rounds after the first (grammars cached, unless the schemas
    were new every round) and over all rounds, structured / plain; the target is checked on
    the first where there are later rounds."""
    later = [r for r in rounds if r.index > 0]
    out = {"all_rounds": _compare(rounds)}
    if later:
        out["later_rounds"] = _compare(later)
    headline = out.get("later_rounds", out["all_rounds"])
    out["target_ratio"] = TARGET_RATIO
    out["met"] = headline["ratio_tpot_median"] <= TARGET_RATIO
    return out


def _compare(rounds: list[RoundResult]) -> dict:
    out: dict = {}
    for kind in ("structured", "plain"):
        rows = [r for r in rounds if r.kind == kind]
        tpot = [t for r in rows for t in r.tpot_ms]
        steps = sum(r.num_steps for r in rows)
        step_s = sum(r.step_ms * r.num_steps for r in rows) / 1e3
        out[kind] = {
            "tpot_ms": _dist(tpot),
            "step_ms": step_s / max(steps, 1) * 1e3,
            "output_tokens": sum(sum(r.output_lens) for r in rows),
            "failed": sum(r.num_failed for r in rows),
        }
    s, p = out["structured"], out["plain"]
    out["ratio_tpot_median"] = s["tpot_ms"]["median"] / p["tpot_ms"]["median"]
    out["ratio_tpot_mean"] = s["tpot_ms"]["mean"] / p["tpot_ms"]["mean"]
    out["ratio_step"] = s["step_ms"] / p["step_ms"]
    return out


def table(summary: dict, compile_stats: dict) -> str:
    lines = [
        "| rounds | requests | TPOT p50 ms | TPOT mean ms | TPOT p90 ms | server step ms "
        "| tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    pools = [p for p in ("later_rounds", "all_rounds") if p in summary]
    for pool in pools:
        for kind in ("plain", "structured"):
            row, tpot = summary[pool][kind], summary[pool][kind]["tpot_ms"]
            lines.append(
                f"| {pool.replace('_', ' ')} | {kind} | {tpot['median']:.2f} "
                f"| {tpot['mean']:.2f} | {tpot['p90']:.2f} | {row['step_ms']:.2f} "
                f"| {row['output_tokens']} |"
            )
    lines.append("")
    for pool in pools:
        ratios = summary[pool]
        lines.append(
            f"structured / plain, {pool.replace('_', ' ')}: TPOT p50 "
            f"x{ratios['ratio_tpot_median']:.3f}, mean x{ratios['ratio_tpot_mean']:.3f}, "
            f"server step x{ratios['ratio_step']:.3f}"
        )
    mark = "met" if summary["met"] else "MISSED"
    lines += [
        f"target: TPOT p50 <= x{TARGET_RATIO:.2f} ({pools[0].replace('_', ' ')}): {mark}",
        "",
        "| per new schema (ms) | median | p90 | max |",
        "|---|---|---|---|",
    ]
    for name, key in (
        ("compile (in process)", "compile_ms"),
        ("cache hit (in process)", "cache_hit_ms"),
        ("first mask (in process)", "first_mask_ms"),
        ("TTFT first use - cache hit (server)", "server_compile_ms"),
        ("TTFT first use (server)", "first_use_ttft_ms"),
        ("TTFT cache hit (server)", "cache_hit_ttft_ms"),
    ):
        d = compile_stats[key]
        lines.append(f"| {name} | {d['median']:.2f} | {d['p90']:.2f} | {d['max']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="server arguments go after `--`"
    )
    parser.add_argument("--out", type=Path, default=Path("results/structured"))
    parser.add_argument("--model", default=None, help="GGUF or HF folder (default: bundled)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=128, help="per round")
    parser.add_argument("--rounds", type=int, default=2, help="of each kind, alternating")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--compile-probes", type=int, default=32, help="new schemas timed")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument(
        "--new-schemas", action="store_true", help="new schemas every round (all compile)"
    )
    parser.add_argument("server_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    args.server_args = [a for a in args.server_args if a != "--"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM (a timeout) unwinds like Ctrl-C, so the server process is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    model_arg = [args.model] if args.model else []
    in_process = compile_timings(args.model, args.compile_probes, args.seed + 3)
    with ServeProcess(model_arg + args.server_args, args.out / "server.log") as server:
        model = httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
        target = ServeTarget(server.base_url, model, endpoint="chat")
        load_before = load_average()
        # Warm-up: the first structured request builds the grammar engine's tokenizer view.
        asyncio.run(compile_probes(target, 2, seed=args.seed + 1))
        compile_stats = asyncio.run(compile_probes(target, args.compile_probes, args.seed + 2))
        compile_stats.update(in_process)
        rounds = asyncio.run(tpot_rounds(server, target, args))
    summary = compare(rounds)
    text = table(summary, compile_stats)
    print(text)
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_average": {"before": load_before, "after": load_average()},
        "summary": summary,
        "grammar_compile": compile_stats,
        "rounds": [asdict(r) for r in rounds],
    }
    (args.out / "structured.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "structured.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
