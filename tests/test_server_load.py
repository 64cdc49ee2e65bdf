"""Many clients at once: 64 simultaneous streams each get what they get alone; clients that
disconnect have their requests aborted and their KV blocks freed, and the server stays healthy."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from tests.server_fixtures import MODEL_NAME, SHARED_ARGS, shared_server_fixture, wait_for

server = shared_server_fixture(*SHARED_ARGS)

TOPICS = [
    "rivers", "mountains", "bread", "violins", "comets", "owls", "glaciers", "tea", "chess",
    "bridges", "deserts", "bees", "lighthouses", "volcanoes", "paper", "clocks", "whales",
    "maps", "salt", "kites", "coral", "trains", "honey", "lanterns", "moss", "copper",
    "storms", "ink", "foxes", "mirrors", "wheat", "caves",
]  # fmt: skip
GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


def chat_body(topic: str, **overrides) -> dict:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": f"Write one sentence about {topic}."}],
        **GREEDY,
    }
    return {**body, **overrides}


def alone(server, topics: list[str]) -> dict[str, str]:
    """Each topic's greedy reply when it is the only request in the server."""
    out = {}
    with httpx.Client(timeout=120) as client:
        for topic in topics:
            r = client.post(server.url("/v1/chat/completions"), json=chat_body(topic))
            assert r.status_code == 200, r.text
            out[topic] = r.json()["choices"][0]["message"]["content"]
    return out


async def stream_text(client, topic: str) -> tuple[str, str | None]:
    """The official client streaming one topic's reply (vLLM's ignore_eos via extra_body)."""
    body = chat_body(topic)
    extra = {"ignore_eos": body.pop("ignore_eos")}
    text, reason = "", None
    stream = await client.chat.completions.create(stream=True, extra_body=extra, **body)
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason


@pytest.fixture(scope="module")
def expected(server) -> dict[str, str]:
    """Every topic's reply alone, asked once for the module's tests."""
    return alone(server, TOPICS)


def test_64_simultaneous_streams_match_alone(server, expected):
    topics = TOPICS * 2  # 64 requests; each prompt twice, so prefix-cache hits happen too

    async def run():
        client = server.async_client(timeout=600)
        try:
            return await asyncio.gather(*(stream_text(client, t) for t in topics))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert [reason for _, reason in results] == ["length"] * 64
    mismatched = [(t, text, expected[t]) for t, (text, _) in zip(topics, results, strict=True)
                  if text != expected[t]]  # fmt: skip
    assert not mismatched
    assert server.metrics()["tokenmill:num_requests_running"] == 0


async def _leave_after(client: httpx.AsyncClient, url: str, body: dict, num_chunks: int) -> int:
    """Stream, then disconnect after `num_chunks` events (0: right after the headers)."""
    seen = 0
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        if num_chunks == 0:
            return 0
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                seen += 1
                if seen >= num_chunks:
                    break
    return seen


async def _finish(client: httpx.AsyncClient, url: str, body: dict) -> str:
    text = ""
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            assert not line.startswith('data: {"error"'), line
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    return text


def test_disconnects_abort_and_free_kv_cache(server, expected):
    url = server.url("/v1/chat/completions")
    before = server.metrics()
    long = {"max_tokens": 1000, "stream": True}

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            stayers = [_finish(client, url, chat_body(t, stream=True)) for t in TOPICS[:16]]
            leavers = [
                _leave_after(client, url, chat_body(t, **long), 0 if i < 4 else 3)
                for i, t in enumerate(TOPICS[16:])
            ]
            return await asyncio.gather(*stayers, *leavers)

    results = asyncio.run(run())
    assert results[:16] == [expected[t] for t in TOPICS[:16]]

    def drained():
        m = server.metrics()
        idle = m["tokenmill:num_requests_running"] == 0 == m["tokenmill:num_requests_waiting"]
        return idle and m["tokenmill:kv_cache_usage_perc"] == 0

    assert wait_for(drained, timeout_s=10), server.metrics()
    after = server.metrics()
    key = f'tokenmill:request_success_total{{finished_reason="abort",model_name="{MODEL_NAME}"}}'
    assert after[key] - before.get(key, 0) == 16
    assert httpx.get(server.url("/health")).status_code == 200
    assert alone(server, TOPICS[:1]) == {TOPICS[0]: expected[TOPICS[0]]}


def test_non_streaming_client_timeout_aborts(server):
    body = chat_body("oceans", max_tokens=2000)
    try:
        httpx.post(server.url("/v1/chat/completions"), json=body, timeout=1.0)
        raise AssertionError("expected the client to time out")
    except httpx.TimeoutException:
        pass

    def drained():
        m = server.metrics()
        return m["tokenmill:num_requests_running"] == 0 and m["tokenmill:kv_cache_usage_perc"] == 0

    assert wait_for(drained, timeout_s=10), server.metrics()


def test_a_long_prompt_does_not_hold_back_a_short_request(server):
    # 3,072 prompt tokens fill six steps of the 512-token budget exactly: uncapped, they leave
    # no room for the short request until their last chunk is done. While the short request
    # waits, the long prompt's chunk is capped (long_prefill_token_threshold), so the short one
    # is admitted at the next step and its first token comes before the long prompt's.
    long_body = {"model": MODEL_NAME, "prompt": [(i * 7919) % 30000 + 100 for i in range(3072)],
                 "max_tokens": 1, "stream": True}  # fmt: skip
    first_token: dict[str, float] = {}

    def stream(name: str, path: str, body: dict) -> None:
        with httpx.stream("POST", server.url(path), json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {") and name not in first_token:
                    first_token[name] = time.monotonic()

    long = threading.Thread(target=stream, args=("long", "/v1/completions", long_body))
    long.start()
    assert wait_for(lambda: server.metrics()["tokenmill:num_requests_running"] >= 1, 30)
    sent = time.monotonic()
    stream("short", "/v1/chat/completions", chat_body("owls", max_tokens=2, stream=True))
    long.join(120)
    assert first_token["short"] < first_token["long"], (
        f"short: {first_token['short'] - sent:.2f} s, long: {first_token['long'] - sent:.2f} s"
    )
