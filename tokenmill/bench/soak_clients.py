"""The soak's clients: N loops, each sending one chat request after another until told to stop.

Each request is drawn from a seeded mix: streamed or whole, greedy or sampled, `max_tokens` the
ShareGPT reference reply's length (capped), and with probability `disconnect_fraction` a client
that leaves early: a stream closed after 0..8 chunks (0: right after the headers), or a whole
answer abandoned at a client timeout of 0.2..3 s. A request that finishes before its client
leaves counts as ok, not as a disconnect.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

MAX_ERRORS_KEPT = 5
MAX_LEAVE_AFTER_CHUNKS = 8
LEAVE_TIMEOUT_S = (0.2, 3.0)
REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ClientMix:
    disconnect_fraction: float = 0.3
    stream_fraction: float = 0.5
    sampled_fraction: float = 0.5
    max_tokens: int = 256
    seed: int = 0


@dataclass(frozen=True)
class SoakRequest:
    prompt: str
    max_tokens: int
    is_stream: bool
    temperature: float
    leave_after_chunks: int | None = None  # streamed: close the connection after this many
    leave_after_s: float | None = None  # whole: abandon the request after this long


@dataclass
class SoakCounts:
    """Cumulative counts over all clients (one event loop: no lock needed)."""

    num_sent: int = 0
    num_ok: int = 0
    num_errors: int = 0
    num_refused: int = 0  # 429: an answer, not a failure
    num_left_stream: int = 0
    num_timed_out: int = 0
    num_cancelled: int = 0  # in flight when the soak ended
    num_output_tokens: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def num_disconnects(self) -> int:
        return self.num_left_stream + self.num_timed_out

    def add_error(self, message: str) -> None:
        self.num_errors += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(message[:300])


def draw_request(rng: random.Random, prompts: Sequence[tuple[str, int]], mix: ClientMix):
    """One request of the mix; `prompts` holds (text, reference output length) pairs."""
    prompt, output_len = prompts[rng.randrange(len(prompts))]
    is_stream = rng.random() < mix.stream_fraction
    temperature = 0.8 if rng.random() < mix.sampled_fraction else 0.0
    leave_after_chunks = leave_after_s = None
    if rng.random() < mix.disconnect_fraction:
        if is_stream:
            leave_after_chunks = rng.randint(0, MAX_LEAVE_AFTER_CHUNKS)
        else:
            leave_after_s = rng.uniform(*LEAVE_TIMEOUT_S)
    return SoakRequest(
        prompt, max(1, min(output_len, mix.max_tokens)), is_stream, temperature,
        leave_after_chunks, leave_after_s,
    )  # fmt: skip


def build_body(model: str, req: SoakRequest) -> dict:
    body: dict = {
        "model": model,
        "messages": [{"role": "user", "content": req.prompt}],
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "stream": req.is_stream,
    }
    if req.temperature > 0:
        body["top_p"] = 0.95
    if req.is_stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _send_stream(client: httpx.AsyncClient, url: str, body: dict, req, counts) -> None:
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            _count_refusal(response.status_code, (await response.aread()).decode(), counts)
            return
        if req.leave_after_chunks == 0:
            counts.num_left_stream += 1
            return  # leaving the block unread closes the connection
        num_chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                counts.num_ok += 1
                return
            chunk = json.loads(data)
            if "error" in chunk:
                counts.add_error(f"stream error: {chunk['error']}")
                return
            if usage := chunk.get("usage"):
                counts.num_output_tokens += int(usage.get("completion_tokens") or 0)
            num_chunks += 1
            if req.leave_after_chunks is not None and num_chunks >= req.leave_after_chunks:
                counts.num_left_stream += 1
                return
    counts.add_error("stream ended without [DONE]")


async def _send_whole(client: httpx.AsyncClient, url: str, body: dict, req, counts) -> None:
    timeout = req.leave_after_s if req.leave_after_s is not None else REQUEST_TIMEOUT_S
    try:
        response = await client.post(url, json=body, timeout=timeout)
    except httpx.TimeoutException:
        if req.leave_after_s is None:
            raise
        counts.num_timed_out += 1
        return
    if response.status_code != 200:
        _count_refusal(response.status_code, response.text, counts)
        return
    data = response.json()
    if not data.get("choices"):
        counts.add_error(f"no choices: {response.text[:200]}")
        return
    counts.num_ok += 1
    counts.num_output_tokens += int((data.get("usage") or {}).get("completion_tokens") or 0)


def _count_refusal(status: int, body: str, counts: SoakCounts) -> None:
    if status == 429:
        counts.num_refused += 1
    else:
        counts.add_error(f"HTTP {status}: {body[:200]}")


async def send_request(
    client: httpx.AsyncClient, url: str, model: str, req: SoakRequest, counts: SoakCounts
) -> None:
    """Send one request and count how it ended; never raises but for cancellation."""
    counts.num_sent += 1
    body = build_body(model, req)
    try:
        if req.is_stream:
            await _send_stream(client, url, body, req, counts)
        else:
            await _send_whole(client, url, body, req, counts)
    except asyncio.CancelledError:
        counts.num_cancelled += 1
        raise
    except (httpx.HTTPError, json.JSONDecodeError, OSError, ValueError) as exc:
        counts.add_error(f"{type(exc).__name__}: {exc}")


async def client_loop(
    client: httpx.AsyncClient, base_url: str, model: str, prompts: Sequence[tuple[str, int]],
    mix: ClientMix, index: int, counts: SoakCounts, stop: asyncio.Event,
) -> None:  # fmt: skip
    rng = random.Random(mix.seed * 100_003 + index)
    url = base_url.rstrip("/") + "/v1/chat/completions"
    while not stop.is_set():
        await send_request(client, url, model, draw_request(rng, prompts, mix), counts)


def make_client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=60.0)
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)
