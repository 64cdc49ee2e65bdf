"""A load generator for any OpenAI-compatible server (tokenmill, llama.cpp's llama-server, vLLM).

Each request of a workload is sent at its arrival offset (behind an optional concurrency limit)
as a streaming completion with `max_tokens` = its output length and `ignore_eos`, so every server
does the same work. Per request it records, on the client's clock:

    sent ---- first token ---- token ---- token ... ---- last token ---- end of stream
    |<-- TTFT -->|<-- ITL -->|<-- ITL -->|
    |<------------------------- end-to-end latency ----------------------------->|
    TPOT = (latency - TTFT) / (output tokens - 1)

Output tokens come from the server's usage report (stream_options.include_usage) when it sends
one, else from the number of streamed chunks that carried text. Metrics: tokenmill.bench.report.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from tokenmill.workload import Workload, WorkloadRequest

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class RequestResult:
    """What one request got back, timings in seconds on the client's clock."""

    ok: bool
    prompt_len: int  # the server's count when it reports usage, else the workload's
    output_len: int  # tokens received
    expected_output_len: int
    start_s: float = 0.0  # when it was sent, from the start of the run
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between text-bearing chunks
    num_chunks: int = 0
    usage_reported: bool = False
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.output_len < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_len - 1)


@dataclass
class LoadRun:
    results: list[RequestResult]
    duration_s: float  # first send to last completion
    max_in_flight: int


@dataclass(frozen=True)
class ServeTarget:
    base_url: str
    model: str
    endpoint: str = "completions"
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout_s: float = 6 * 3600.0


def synthetic_prompt(
    prompt_len: int, seed: int, vocab: tuple[int, int] = (1000, 30000)
) -> list[int]:
    """Token ids for a workload request without text: a distinct random sequence per request, so
    no prefix cache shortcuts the prefill."""
    rng = random.Random(seed)
    return [rng.randrange(*vocab) for _ in range(prompt_len)]


def build_payload(target: ServeTarget, req: WorkloadRequest, index: int) -> dict:
    prompt: str | list[int] = (
        req.prompt if req.prompt is not None else synthetic_prompt(req.prompt_len, index)
    )
    payload: dict = {
        "model": target.model,
        "max_tokens": req.output_len,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": target.ignore_eos,
    }
    if target.endpoint == "chat":
        if not isinstance(prompt, str):
            raise ValueError("the chat endpoint needs text prompts (a dataset workload)")
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    return payload


def _chunk_text(chunk: dict, endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send_request(
    client: httpx.AsyncClient,
    target: ServeTarget,
    req: WorkloadRequest,
    index: int,
    t0: float,
    first_token: asyncio.Event | None = None,
) -> RequestResult:
    """Stream one completion and time it; never raises for a failed request. `first_token` is
    set once the first token arrives (or the request ends without one)."""
    result = RequestResult(False, req.prompt_len, 0, req.output_len)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    url = target.base_url.rstrip("/") + ENDPOINTS[target.endpoint]
    sent = time.perf_counter()
    result.start_s = sent - t0
    try:
        async with client.stream(
            "POST", url, json=build_payload(target, req, index), headers=headers
        ) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            if not await _read_stream(response, result, target.endpoint, sent, first_token):
                return result
        result.latency_s = time.perf_counter() - sent  # the whole response, usage included
        if not result.usage_reported:
            result.output_len = result.num_chunks
        result.ok = result.num_chunks > 0
        if not result.ok:
            result.error = "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if first_token is not None:
            first_token.set()
    return result


async def _read_stream(
    response: httpx.Response, result: RequestResult, endpoint: str, sent: float,
    first_token: asyncio.Event | None,
) -> bool:  # fmt: skip
    """Time the server-sent events of one response into `result`; False when the stream
    reported an error (in `result.error`)."""
    last = sent
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = str(chunk["error"])[:300]
            return False
        now = time.perf_counter()
        if _chunk_text(chunk, endpoint):
            if result.num_chunks == 0:
                result.ttft_s = now - sent
                if first_token is not None:
                    first_token.set()
            else:
                result.itl_s.append(now - last)
            result.num_chunks += 1
            last = now
        if usage := chunk.get("usage"):
            result.usage_reported = True
            result.output_len = int(usage.get("completion_tokens") or 0)
            result.prompt_len = int(usage.get("prompt_tokens") or result.prompt_len)
    return True


def make_client(target: ServeTarget, max_connections: int) -> httpx.AsyncClient:
    # httpx allows 100 connections by default; requests above that would queue in the client
    # and their TTFT would count time the server never saw.
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    timeout = httpx.Timeout(target.timeout_s, connect=60.0)
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)


async def _run_async(
    target: ServeTarget, workload: Workload, num_warmup: int, progress: bool
) -> LoadRun:
    from tqdm import tqdm

    requests = workload.requests
    limit = workload.max_concurrency or len(requests)
    async with make_client(target, limit + num_warmup + 1) as client:
        if num_warmup:
            # Warm-up requests run first and are not measured: short, distinct prompts.
            warm = [WorkloadRequest(None, 16, 8)] * num_warmup
            t_warm = time.perf_counter()
            done = await asyncio.gather(
                *(send_request(client, target, r, -1 - i, t_warm) for i, r in enumerate(warm))
            )
            failed = [r.error for r in done if not r.ok]
            if failed:
                raise RuntimeError(f"warm-up request failed: {failed[0]}")
        semaphore = asyncio.Semaphore(limit)
        bar = tqdm(total=len(requests), desc="requests", disable=not progress)
        in_flight = max_in_flight = 0
        t0 = time.perf_counter()

        async def one(index: int, req: WorkloadRequest) -> RequestResult:
            nonlocal in_flight, max_in_flight
            delay = req.arrival_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            async with semaphore:
                in_flight += 1
                max_in_flight = max(max_in_flight, in_flight)
                try:
                    return await send_request(client, target, req, index, t0)
                finally:
                    in_flight -= 1
                    bar.update(1)

        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        duration = time.perf_counter() - t0
        bar.close()
    return LoadRun(list(results), duration, max_in_flight)


def run_load(
    target: ServeTarget, workload: Workload, num_warmup: int = 1, progress: bool = True
) -> LoadRun:
    """Send `workload` to `target`; returns every request's result and the run's duration."""
    return asyncio.run(_run_async(target, workload, num_warmup, progress))


def first_model(base_url: str, api_key: str | None = None) -> str:
    """The id of the first model /v1/models lists (what the server serves by default)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30.0)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def errors_summary(results: Sequence[RequestResult], limit: int = 3) -> list[str]:
    return [r.error for r in results if not r.ok][:limit]


def open_model_info(model: str | None):
    """The LoadedModel (arch, tokenizer; weights not read) of a GGUF or HF folder, None: the
    bundled model. Workloads measure ShareGPT lengths with its tokenizer."""
    from tokenmill.config import ModelConfig
    from tokenmill.loader.registry import open_model

    return open_model(ModelConfig(model=model))
