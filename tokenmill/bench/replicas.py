"""Replicas on Ray Serve: prefix-aware vs round-robin routing on multi-turn ShareGPT chats.

    python -m tokenmill.bench.replicas --conversations 16 --turns 4 --concurrency 8

Each conversation is replayed turn by turn as a chat client would: the next user turn is sent
with the whole history, the replies being the server's own (streamed, so TTFT is measured at
the first content chunk). Runs, on one local Ray instance: 1 replica (the reference hit rate and
throughput), 2 replicas prefix-aware, 2 replicas round-robin. The prefix-cache hit rate is the
replicas' own counters (prompt tokens found in the cache / looked up), summed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenmill.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class RunResult:
    name: str
    num_replicas: int
    routing: str
    num_requests: int
    wall_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    output_tokens_per_s: float
    prefix_hit_rate: float  # prompt tokens found in the prefix cache / looked up
    requests_per_replica: dict


class _Ingress:
    def __init__(self, app) -> None:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


async def _chat(client, history: list[dict], max_tokens: int) -> tuple[float, str, int]:
    start = time.perf_counter()
    ttft, parts, num_tokens = None, [], 0
    stream = await client.chat.completions.create(
        model=MODEL_NAME, messages=history, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.usage is not None:
            num_tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
    return ttft if ttft is not None else time.perf_counter() - start, "".join(parts), num_tokens


async def replay(base_url: str, convs: list[list[str]], concurrency: int, max_tokens: int):
    """Every conversation turn by turn, `concurrency` conversations at a time: TTFTs, tokens."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=600)
    queue: asyncio.Queue = asyncio.Queue()
    for conv in convs:
        queue.put_nowait(conv)
    ttfts: list[float] = []
    num_tokens = 0

    async def worker() -> None:
        nonlocal num_tokens
        while not queue.empty():
            history: list[dict] = []
            for turn in queue.get_nowait():
                history.append({"role": "user", "content": turn})
                ttft, reply, n = await _chat(client, history, max_tokens)
                history.append({"role": "assistant", "content": reply})
                ttfts.append(ttft)
                num_tokens += n

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return ttfts, num_tokens


def _hit_rate(engine) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    hits = queries = 0.0
    for report in engine.table.reports().values():
        for family in text_string_to_metric_families(report.metrics_text):
            for sample in family.samples:
                if sample.name == "tokenmill:prefix_cache_hits_total":
                    hits += sample.value
                elif sample.name == "tokenmill:prefix_cache_queries_total":
                    queries += sample.value
    return hits, queries


def _wait_for_reports(engine, num_replicas: int, since: float) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reports = engine.table.reports()
        if len(reports) >= num_replicas and all(r.time > since for r in reports.values()):
            return
        time.sleep(0.1)


def run_one(name: str, num_replicas: int, routing: str, engine_config, convs, args) -> RunResult:
    from tokenmill.serve_ray.cluster import ReplicaSetConfig, create_replica_app, deploy_replicas
    from tokenmill.server.state import ServerConfig

    config = ReplicaSetConfig(num_replicas=num_replicas, routing=routing, app_name=name)
    engine = deploy_replicas(engine_config, MODEL_NAME, config)
    ingress = _Ingress(create_replica_app(engine, ServerConfig(model_name=MODEL_NAME)))
    try:
        start = time.perf_counter()
        ttfts, num_tokens = asyncio.run(
            replay(ingress.base, convs, args.concurrency, args.max_tokens)
        )
        wall = time.perf_counter() - start
        _wait_for_reports(engine, num_replicas, time.time())
        hits, queries = _hit_rate(engine)
        per_replica: dict[str, int] = {}
        for decision in engine.table.decisions:
            per_replica[decision.replica] = per_replica.get(decision.replica, 0) + 1
    finally:
        ingress.stop()
        from ray import serve

        serve.delete(name)
    quantiles = statistics.quantiles(ttfts, n=10)
    return RunResult(
        name, num_replicas, routing, len(ttfts), wall, statistics.median(ttfts), quantiles[8],
        num_tokens / wall, hits / queries if queries else 0.0, per_replica,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-chars", type=int, default=600, help="clip each user turn")
    parser.add_argument("--kv-cache-memory", type=float, default=1.0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--output", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    from tokenmill.serve_ray.cluster import ReplicaSetConfig, start_ray
    from tokenmill.workload.sharegpt import load_conversations

    convs = [
        [user for user, _ in conv]
        for conv in load_conversations(args.conversations, args.turns, args.max_chars)
    ]
    engine_config = EngineConfig(
        model=ModelConfig(dtype=args.dtype),
        cache=CacheConfig(kv_cache_memory_gib=args.kv_cache_memory),
        scheduler=SchedulerConfig(),
    )
    start_ray(ReplicaSetConfig(num_replicas=2))
    runs = [("one", 1, "prefix-aware"), ("prefix", 2, "prefix-aware"), ("rr", 2, "round-robin")]
    results = [run_one(*run, engine_config, convs, args) for run in runs]
    for r in results:
        print(json.dumps(asdict(r)), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
