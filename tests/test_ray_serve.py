"""Two engine replicas on Ray Serve behind tokenmill's own server (`tokenmill serve --replicas`):
greedy outputs equal a direct engine's, the router follows the longest cached prefix, merged
metrics, and a replica killed under load loses no non-streamed request.

One local Ray instance and one deployment for the module (Ray and two model loads take ~20 s);
the ingress app is served by uvicorn on a real socket in this process, so the tests can read the
router's table and kill replicas through Ray.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest

pytest.importorskip("ray.serve")

from tests._sharegpt import iter_records  # noqa: E402
from tests.server_fixtures import MODEL_NAME, parse_metrics, wait_for  # noqa: E402
from tokenmill.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402

APP = "tokenmill-test"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three primary colors are",
]


class Ingress:
    """The app under uvicorn on a free port, in a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        assert wait_for(lambda: self.server.started, timeout_s=30)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url("/v1"), api_key="EMPTY", max_retries=0, timeout=120)

    def async_client(self):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.url("/v1"), api_key="EMPTY", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def replicas():
    from tokenmill.serve_ray.cluster import (
        ReplicaSetConfig,
        create_replica_app,
        deploy_replicas,
        stop_replicas,
    )
    from tokenmill.server.state import ServerConfig

    config = ReplicaSetConfig(num_replicas=2, app_name=APP, stats_period_s=0.2)
    engine_config = EngineConfig(
        model=ModelConfig(dtype="float32"),
        cache=CacheConfig(kv_cache_memory_gib=0.25),
        scheduler=SchedulerConfig(max_num_batched_tokens=512),
    )
    try:
        engine = deploy_replicas(engine_config, MODEL_NAME, config)
        ingress = Ingress(create_replica_app(engine, ServerConfig(model_name=MODEL_NAME)))
        yield ingress, engine
        ingress.stop()
    finally:
        stop_replicas(config)


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def test_greedy_outputs_equal_a_direct_engine(replicas, llm_fp32):
    ingress, _ = replicas
    client = ingress.client()
    direct = [o.outputs[0].text for o in llm_fp32.generate(PROMPTS, _greedy(16))]
    routed = [
        client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=16, temperature=0)
        .choices[0]
        .text
        for p in PROMPTS
    ]
    assert routed == direct
    messages = [{"role": "user", "content": "Name a fruit."}]
    (chat,) = llm_fp32.chat(messages, _greedy(12))
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
        chat.outputs[0].text
    )


def test_errors_are_the_servers_own(replicas):
    ingress, _ = replicas
    r = httpx.post(ingress.url("/v1/completions"), json={"prompt": "x", "max_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    too_long = {"prompt": "hi " * 9000, "max_tokens": 4}
    r = httpx.post(ingress.url("/v1/completions"), json=too_long, timeout=60)
    assert r.status_code == 400, r.text
    assert httpx.get(ingress.url("/health")).json() == {"status": "ok"}


def _conversations(num: int, num_turns: int) -> list[list[str]]:
    """Human turns (clipped) of ShareGPT conversations with at least `num_turns` of them."""
    out = []
    for record in iter_records(2000):
        turns = [t["value"][:400] for t in record.get("conversations", []) if t["from"] == "human"]
        if len(turns) >= num_turns and all(t.strip() for t in turns[:num_turns]):
            out.append(turns[:num_turns])
            if len(out) == num:
                break
    return out


def _wait_for_fresh_reports(engine, since: float) -> None:
    def fresh():
        reports = engine.table.reports()
        return len(reports) == 2 and all(r.time > since for r in reports.values())

    assert wait_for(fresh, timeout_s=20)


def test_router_follows_the_longest_cached_prefix(replicas):
    """Multi-turn chats, each turn's prompt extending the last: each request goes to the
    replica whose report holds the longest cached prefix of it."""
    ingress, engine = replicas
    client = ingress.client()
    histories: list[list[dict]] = [[] for _ in range(4)]
    request_ids = []
    for turn in range(3):
        for conv, turns in enumerate(_conversations(4, 3)):
            _wait_for_fresh_reports(engine, time.time())
            histories[conv].append({"role": "user", "content": turns[turn]})
            reply = client.chat.completions.create(
                model=MODEL_NAME, messages=histories[conv], max_tokens=6, temperature=0
            )
            histories[conv].append(
                {"role": "assistant", "content": reply.choices[0].message.content}
            )
            request_ids.append(reply.id)
    decisions = {d.request_id: d for d in engine.table.decisions}
    ours = [decisions[i] for i in request_ids]
    matches = [d.num_reported[d.replica] == max(d.num_reported.values()) for d in ours]
    assert sum(matches) >= 0.95 * len(ours), [vars(d) for d in ours]
    later = ours[4:]  # turns 2 and 3: their history is cached somewhere
    assert all(d.num_reported[d.replica] > 0 for d in later), [vars(d) for d in later]
    assert all(d.reason == "prefix" for d in later)


def test_metrics_are_merged_with_a_replica_label(replicas):
    ingress, engine = replicas
    _wait_for_fresh_reports(engine, time.time())
    samples = parse_metrics(httpx.get(ingress.url("/metrics")).text)
    replicas_seen = {
        key.split('replica="', 1)[1].split('"', 1)[0]
        for key in samples
        if key.startswith("tokenmill:prefix_cache_hits_total{")
    }
    assert replicas_seen == set(engine.table.reports())
    assert samples["tokenmill:prefix_cache_hits_total"] > 0
    assert samples["tokenmill:router_requests_total"] > 0
    assert samples["tokenmill:router_replicas"] == 2


def _replica_actor(replica_id: str):
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith(replica_id):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise LookupError(replica_id)


async def _load_and_kill(ingress, engine, prompts: list[str]):
    import ray

    client = ingress.async_client()
    stream = await client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=400, temperature=0, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    first = await stream.__anext__()
    num_routed = len(engine.table.decisions)
    tasks = [
        asyncio.ensure_future(
            client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=24, temperature=0)
        )
        for p in prompts
    ]
    streamed_on = {d.request_id: d.replica for d in engine.table.decisions}[first.id]

    def all_routed():
        return len(engine.table.decisions) >= num_routed + len(prompts)

    assert await asyncio.to_thread(wait_for, all_routed)
    routed = list(engine.table.decisions)[num_routed:]
    assert any(d.replica == streamed_on for d in routed)  # spread by load: no shared prefix
    await asyncio.sleep(0.5)  # requests in flight on both replicas
    ray.kill(_replica_actor(streamed_on), no_restart=True)
    stream_error = None
    try:
        async for _ in stream:
            pass
    except Exception as exc:  # noqa: BLE001 - the error event the stream ended with
        stream_error = exc
    return [await t for t in tasks], streamed_on, stream_error


def test_a_killed_replica_loses_no_request(replicas, llm_fp32):
    from ray import serve

    ingress, engine = replicas
    prompts = [f"{p} (take {i})" for i in range(3) for p in PROMPTS]
    replies, killed, stream_error = asyncio.run(_load_and_kill(ingress, engine, prompts))
    direct = [o.outputs[0].text for o in llm_fp32.generate(prompts, _greedy(24))]
    assert [r.choices[0].text for r in replies] == direct
    assert stream_error is not None and "replica" in str(stream_error)
    assert engine.num_resent > 0

    def replaced():
        deployment = serve.status().applications[APP].deployments["EngineReplica"]
        running = deployment.replica_states.get("RUNNING", 0)
        return running == 2 and killed not in engine.table.reports()

    assert wait_for(replaced, timeout_s=120)
