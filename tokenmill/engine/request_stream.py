"""One request's output stream from the async engine, and what the engine reports per request.

The engine's loop thread puts outputs into the stream through its event loop; the consumer
iterates it with `async for` on that loop.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from tokenmill.errors import TokenmillError
from tokenmill.outputs import RequestOutput

if TYPE_CHECKING:
    from tokenmill.engine.async_engine import AsyncEngine


class EngineStoppedError(TokenmillError):
    """The engine is shutting down (or its loop has stopped) and takes no new requests."""


class EngineInternalError(TokenmillError):
    """An unexpected fault inside the engine step ended this request."""


class RequestStream:
    """The outputs of one request, in order; the last one has `finished` set.

    Iterate it with `async for`. Call `abort()` when the consumer goes away before the end (it is
    a no-op once finished), so the engine frees the request's KV blocks at the next step.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._close()
            raise item
        if item.finished:
            self._close()
        return item

    def abort(self) -> None:
        if not self.finished:
            self._close()
            self._engine._request_abort(self)
            # Wake any other task still waiting on this stream: it ends instead of hanging.
            self._queue.put_nowait(StopAsyncIteration())

    def _close(self) -> None:
        self.finished = True
        self._engine._open_streams.discard(self)

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)
