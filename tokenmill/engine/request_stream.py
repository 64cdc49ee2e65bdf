"""One request's output stream from the async engine, and what the engine reports per request.

The engine's loop thread puts outputs into the stream through its event loop; the consumer
iterates it with `async for` on that loop.

Paced delivery (`pace_s`, from slo_max_jitter): a promised request's outputs are handed out no
sooner than a mean gap of `pace_s` per token since its first, so its TPOT as the client sees it
lies between its planned TPOT over the jitter bound and the planned TPOT, in a lull or a burst
alike. The engine computes at full speed (seats, KV blocks and batch slots are freed as early as
without pacing); only delivery waits.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

from tokenmill.errors import TokenmillError
from tokenmill.outputs import RequestOutput

if TYPE_CHECKING:
    from tokenmill.engine.async_engine import AsyncEngine


# Paced deliveries are due on a common grid: one event-loop wakeup hands out every stream due
# then, instead of one per stream (each wakeup takes the GIL from the engine's thread).
PACE_TICK_S = 0.01


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
        self.pace_s: float | None = None  # the least mean gap per token handed out (None: none)
        self._first: tuple[float, int] | None = None  # (when, tokens) of the first delivery
        self._num_tokens = 0  # per sample, the most handed out
        self._is_delta = True  # outputs carry only what is new (else: everything so far)

    def set_pace(self, pace_s: float | None, is_delta: bool) -> None:
        """Pace delivery (set by the engine's loop thread before the add is answered)."""
        self.pace_s, self._is_delta = pace_s, is_delta

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._close()
            raise item
        if self.pace_s is not None:
            await self._pace(item)
        if item.finished:
            self._close()
        return item

    async def _pace(self, output: RequestOutput) -> None:
        """Wait until `output`'s last token is due: pace_s per token after the first delivery."""
        counts = [len(o.token_ids) for o in output.outputs]
        if self._is_delta:
            self._num_tokens += max(counts, default=0)
        else:
            self._num_tokens = max(counts, default=0)
        now = self._loop.time()
        if self._first is None:
            self._first = (now, self._num_tokens)
            return
        due = self._first[0] + (self._num_tokens - self._first[1]) * self.pace_s
        due = math.ceil(due / PACE_TICK_S) * PACE_TICK_S  # paced streams wake together
        if due > now:
            await asyncio.sleep(due - now)

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
