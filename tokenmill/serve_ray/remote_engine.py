"""The replicas behind the server's engine interface: what `AsyncEngine` is to `tokenmill serve`,
`ReplicaSetEngine` is to the ingress of `tokenmill serve --replicas N`.

    server handler --add_request--> ReplicaSetEngine: tokens, block keys -> ReplicaRequest
                                    handle.generate (stream) --router--> one replica
                   <--RemoteStream-- Accepted (or the refusal raised here), then outputs

Faults: a replica that dies (or cannot be reached) before a request's first output, or at any
point of a non-streamed request, has the request sent again, to another replica when the router
has seen the death (at most `max_attempts` sends in all); a stream that already delivered tokens
ends with `ReplicaLostError` (an error event for the client). Serve replaces the dead replica.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError

from tokenmill.engine.async_engine import ServingStats
from tokenmill.engine.request_stream import EngineStoppedError
from tokenmill.engine.stats import EngineStats
from tokenmill.errors import TokenmillError
from tokenmill.outputs import OutputKind, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.serve_ray.prefix_index import block_keys
from tokenmill.serve_ray.routing_table import RoutingTable
from tokenmill.serve_ray.wire import Accepted, Failed, Refused, ReplicaRequest, wire_params
from tokenmill.workload.slo import SLO

logger = logging.getLogger(__name__)

# A replica that died or cannot be reached (Serve's handle raises these for its calls).
REPLICA_LOST = (RayActorError, ActorUnavailableError)
_RETRY_BACKOFF_S = 0.2


class ReplicaLostError(TokenmillError):
    """The replica serving a request died after the request's stream had started."""


class ReplicaSetEngine:
    """Routes each request to a replica of a Serve deployment of `EngineReplica`s."""

    def __init__(
        self,
        handle: Any,
        table: RoutingTable,
        tokenizer: Any,
        max_model_len: int,
        block_size: int,
        max_attempts: int = 4,
    ) -> None:
        self._generate = handle.options(stream=True).generate
        self.table = table
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.max_attempts = max_attempts
        self.num_resent = 0  # requests sent again after their replica was lost
        self._accepting = True
        self._open_streams: set[RemoteStream] = set()

    @property
    def is_running(self) -> bool:
        return self._accepting

    def add_observer(self, observer: object) -> None:
        """Latencies are observed by each replica's own metrics (merged at /metrics)."""

    def stats(self) -> ServingStats:
        """The sum of the replicas' latest reports (one stats period old at most)."""
        reports = self.table.reports().values()
        engine = EngineStats(
            num_running=sum(r.num_running for r in reports),
            num_waiting=sum(r.num_waiting for r in reports),
        )
        return ServingStats(
            engine=engine, num_streams=len(self._open_streams), is_running=self.is_running
        )

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        output_kind: OutputKind = OutputKind.DELTA,
        slo: SLO | None = None,
        arrival_time: float | None = None,
    ) -> RemoteStream:
        """Send the request to a replica; returns once that replica's engine accepted it, or
        raises its refusal (invalid request, queue full, SLO unattainable) here."""
        if not self.is_running:
            raise EngineStoppedError("the engine is shutting down and takes no new requests")
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request = ReplicaRequest(
            request_id, token_ids, wire_params(params), priority, output_kind, slo,
            tuple(block_keys(token_ids, self.block_size)), arrival_time,
        )  # fmt: skip
        stream = RemoteStream(self, request)
        self._open_streams.add(stream)
        try:
            await stream.start()
        except BaseException:
            stream.abort()
            raise
        return stream

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop accepting; let open streams finish until the deadline, then cancel them."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._open_streams and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self.close()

    def close(self) -> None:
        self._accepting = False
        for stream in list(self._open_streams):
            stream.abort()


class RemoteStream:
    """A request's outputs from its replica, with `RequestStream`'s interface."""

    def __init__(self, engine: ReplicaSetEngine, request: ReplicaRequest) -> None:
        self.request_id = request.request_id
        self.finished = False
        self.replica_id: str | None = None
        self._engine = engine
        self._request = request
        self._gen: Any = None
        self._num_outputs = 0
        self._num_sends = 0

    async def start(self) -> None:
        while True:
            self._gen = self._engine._generate.remote(self._request)
            self._num_sends += 1
            try:
                first = await self._gen.__anext__()
                break
            except REPLICA_LOST as exc:
                await self._before_resend(exc)
        if isinstance(first, Refused):
            self._close()
            raise first.error.rebuild()
        if not isinstance(first, Accepted):
            raise TypeError(f"a replica answered {type(first).__name__} first")
        self.replica_id = first.replica_id

    async def _before_resend(self, exc: BaseException) -> None:
        if self._num_sends >= self._engine.max_attempts:
            self._close()
            raise ReplicaLostError(
                f"request {self.request_id}: {self._num_sends} replicas were lost serving it; "
                "retry the request"
            ) from exc
        logger.warning("request %s: replica lost (%s); sending it again", self.request_id, exc)
        self._engine.num_resent += 1
        await asyncio.sleep(_RETRY_BACKOFF_S * self._num_sends)

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self.finished:
                raise StopAsyncIteration
            try:
                item = await self._gen.__anext__()
            except REPLICA_LOST as exc:
                await self._resend_or_end(exc)
                continue
            except StopAsyncIteration:
                self._close()  # the replica ended it unfinished: aborted there
                raise
            except Exception:
                if self.finished:  # aborted meanwhile: the call was cancelled
                    raise StopAsyncIteration from None
                raise
            if isinstance(item, Failed):
                self._close()
                raise item.error.rebuild()
            self._num_outputs += 1
            if item.finished:
                self._close()
            return item

    async def _resend_or_end(self, exc: BaseException) -> None:
        streamed = self._request.output_kind == OutputKind.DELTA and self._num_outputs
        if streamed:
            self._close()
            raise ReplicaLostError(
                f"replica {self.replica_id} died while streaming request {self.request_id} "
                f"(after {self._num_outputs} outputs); the stream is cut short: retry the request"
            ) from exc
        await self._before_resend(exc)
        await self.start()

    def abort(self) -> None:
        if not self.finished:
            self._close()
            if self._gen is not None:
                self._gen.cancel()

    def _close(self) -> None:
        self.finished = True
        self._engine._open_streams.discard(self)
