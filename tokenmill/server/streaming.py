"""Getting engine streams to the client: SSE framing, merging, and abort on disconnect.

Server-sent events exactly as OpenAI frames them:

    data: {"id": ..., "choices": [...]}\\n\\n
    ...
    data: [DONE]\\n\\n

Every path that ends a response early (client gone, error, shutdown) aborts the request streams it
holds, so their KV blocks go back to the pool at the next engine step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenmill.engine.async_engine import (
    AsyncEngine,
    EngineInternalError,
    EngineStoppedError,
    RequestStream,
)
from tokenmill.engine.scheduler import EXPIRED_STOP_REASON
from tokenmill.errors import SloUnattainableError
from tokenmill.outputs import CompletionOutput, OutputKind, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import error_from_exception
from tokenmill.workload.slo import SLO

DONE = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The client went away before its (non-streaming) response was ready."""


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def sse_error(exc: BaseException) -> str:
    """An error after the 200 headers went out: an `error` event, as vLLM and OpenAI send."""
    return f"data: {error_from_exception(exc).body_json()}\n\n"


class EventStreamResponse(StreamingResponse):
    """An SSE response that aborts its request streams however the response ends."""

    def __init__(self, events: AsyncIterator[str], streams: Sequence[RequestStream]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            abort_all(self._streams)


def raise_if_failed(output: CompletionOutput) -> None:
    """A sample the engine ended with an error fails its whole response (500 / error event); one
    that expired in the queue (--slo-policy queue: its TTFT could no longer be met) fails it as
    a refusal (429 slo_unattainable / its error event)."""
    if output.finish_reason == "abort" and output.stop_reason == EXPIRED_STOP_REASON:
        raise SloUnattainableError(
            "its ttft target can no longer be met: it waited in the queue past the last moment "
            "it could start", 1.0, "ttft_expired",
        )  # fmt: skip
    if output.finish_reason == "error":
        raise EngineInternalError(f"generation failed: {output.stop_reason or 'internal error'}")


def received_at(request: Request) -> float | None:
    """When BodyLimitMiddleware had the request's whole body (time.time()), if it ran."""
    return getattr(request.state, "received_at", None)


def abort_all(streams: Sequence[RequestStream]) -> None:
    for stream in streams:
        stream.abort()


async def add_all(
    engine: AsyncEngine,
    request_id: str,
    prompts: list[list[int]],
    params: list[SamplingParams],
    priority: int,
    is_streamed: bool,
    slo: SLO | None = None,
    arrival_time: float | None = None,
) -> list[RequestStream]:
    """Add one engine request per prompt; if any add fails, abort the ones already added.
    `arrival_time` (time.time()): when the server had the whole request (`received_at`).

    A streamed response gets DELTA outputs (each chunk costs what it carries); a whole one a
    single FINAL_ONLY output."""
    kind = OutputKind.DELTA if is_streamed else OutputKind.FINAL_ONLY
    streams: list[RequestStream] = []
    try:
        for idx, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            sub_id = request_id if len(prompts) == 1 else f"{request_id}-{idx}"
            streams.append(
                await engine.add_request(sub_id, prompt, p, priority, kind, slo, arrival_time)
            )
    except BaseException:
        abort_all(streams)
        raise
    return streams


async def merged(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from all streams as they arrive; aborts them all if stopped early."""
    try:
        if len(streams) == 1:
            async for output in streams[0]:
                yield 0, output
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(idx: int, stream: RequestStream) -> None:
            try:
                async for output in stream:
                    queue.put_nowait((idx, output))
            except Exception as exc:  # noqa: BLE001 - re-raised by the consumer below
                queue.put_nowait((idx, exc))
            queue.put_nowait((idx, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                idx, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield idx, item
        finally:
            for task in tasks:
                task.cancel()
    finally:
        abort_all(streams)


async def final_outputs(request: Request, streams: Sequence[RequestStream]) -> list[RequestOutput]:
    """Each stream's last output; raises ClientDisconnected (after aborting) if the client leaves.

    A non-streaming request sends nothing until the end, so the disconnect is watched for.
    """

    async def last(stream: RequestStream) -> RequestOutput:
        final = None
        async for output in stream:
            final = output
        if final is None or not final.finished:
            raise EngineStoppedError(f"request {stream.request_id} was aborted")
        return final

    tasks = [asyncio.ensure_future(last(s)) for s in streams]
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        pending = set(tasks)
        while pending:
            done, _ = await asyncio.wait(
                {*pending, disconnect}, return_when=asyncio.FIRST_COMPLETED
            )
            if disconnect in done:
                raise ClientDisconnected()
            for task in done:
                task.result()  # the first failure fails the response
            pending -= done
        return [task.result() for task in tasks]
    finally:
        for task in (*tasks, disconnect):
            task.cancel()
        abort_all(streams)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
