"""The async engine: LLMEngine's step loop on a background thread, one output stream per request.

    asyncio side (any event loop)              loop thread (owns the LLMEngine)
    ---------------------------------          ---------------------------------------
    add_request() --- _Add -----------------> command queue, drained before every step
         ^  (awaits the add's outcome)           engine.add_request / abort_request
    RequestStream <-- call_soon_threadsafe -- engine.step() outputs, one batch per loop
    stream.abort() --- _Abort --------------> abort: KV blocks freed before the next step

LLMEngine is not thread-safe: only the loop thread touches it, the asyncio side talks to it through
the command queue. The forward pass releases the GIL, so the event loop keeps serving HTTP while a
step runs. With nothing in flight the loop thread trims the heap and sleeps on an event.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tokenmill.config import EngineConfig
from tokenmill.engine.build import build_engine
from tokenmill.engine.heap_trim import HeapTrimmer
from tokenmill.engine.latency import LatencyReporter, RequestObserver, StreamTrack
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.request_stream import EngineInternalError, EngineStoppedError, RequestStream
from tokenmill.engine.stats import ServingStats
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import OutputKind, RequestOutput
from tokenmill.perf.trace import StepRecord
from tokenmill.sampling_params import SamplingParams
from tokenmill.workload.slo import SLO

logger = logging.getLogger(__name__)

# A step that neither produced output nor consumed tokens did no work (nothing schedulable);
# back off this long instead of spinning on it.
_NO_PROGRESS_BACKOFF_S = 0.005


# ---- commands from the asyncio side to the loop thread ------------------------------------


@dataclass
class _Add:
    stream: RequestStream
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    added: asyncio.Future  # resolved on the stream's loop: None, or the add_request exception
    arrival: float  # time.monotonic() when the caller asked, so TTFT includes the hand-over
    output_kind: OutputKind = OutputKind.DELTA
    slo: SLO | None = None  # latency targets (None: the engine's default)
    arrival_time: float = 0.0  # time.time() the caller had it: what a TTFT promise counts from


@dataclass
class _Abort:
    stream: RequestStream


@dataclass
class _Stop:  # abort everything in flight (consumers get EngineStoppedError), end the loop
    reason: str


class AsyncEngine:
    """Runs an LLMEngine on a background thread and streams each request's outputs to asyncio.

    `generate()` / `add_request()` may be called from any event loop; outputs are delivered to
    the loop that added the request. Errors from LLMEngine.add_request (invalid request, context
    length, overloaded queue) raise in the caller.
    """

    def __init__(self, engine: LLMEngine | None = None, *, build=None) -> None:
        """Either an engine built already, or `build()`, called on the engine thread: then every
        torch operation of the process (loading, warm-up, steps) runs on that one thread.

        On a CPU each thread that runs OpenMP regions gets its own team of workers; teams that
        together outnumber the cores make a 135M-model decode step 2x as long (BENCHMARKS.md)."""
        if (engine is None) == (build is None):
            raise ValueError("give either an engine or a build function (exactly one)")
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._tracks: dict[str, StreamTrack] = {}  # loop thread only
        self._latency = LatencyReporter()
        self._accepting = True
        self._stats = ServingStats()
        self._step_time_total_s = 0.0
        self._loop_time_total_s = 0.0
        # Called on the loop thread whenever no request is left (the step-trace writer); never raises.
        self.idle_hook: Callable[[], None] | None = None
        self._heap = HeapTrimmer()  # loop thread only
        # Streams whose consumer has not seen the end yet (any thread; set ops are atomic).
        self._open_streams: set[RequestStream] = set()
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run_loop, args=(build,), name="tokenmill-engine", daemon=True
        )
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(build=lambda: build_engine(config))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def step_trace(self) -> list[StepRecord]:
        """The engine's step trace (EngineConfig.record_step_trace); read it on the loop thread
        (e.g. from `idle_hook`), where it is not being appended to."""
        return self.engine.step_trace

    # ---- asyncio side ------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._accepting and self._thread.is_alive()

    def add_observer(self, observer: RequestObserver) -> None:
        self._latency.add(observer)

    def prefix_cache_hashes(self) -> list[bytes]:
        """The block hashes in the prefix cache, for a replica router (any thread)."""
        return self.engine.kv_manager.cached_block_hashes()

    def stats(self) -> ServingStats:
        """The latest snapshot (taken on the loop thread; never touches the engine)."""
        return self._stats

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        output_kind: OutputKind = OutputKind.DELTA,
        slo: SLO | None = None,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Add a request and return its output stream once the engine has accepted it.

        `output_kind`: DELTA (each output carries only what is new), FINAL_ONLY or CUMULATIVE.
        `slo`: its latency targets (LLMEngine.add_request), counted from `arrival_time`
        (time.time(); default now: a server passes when it had the whole request).
        """
        if not self.is_running:
            raise EngineStoppedError("the engine is shutting down and takes no new requests")
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id, loop)
        self._open_streams.add(stream)
        added = loop.create_future()
        arrival = time.time() if arrival_time is None else arrival_time
        self._post(
            _Add(
                stream, prompt, params, priority, added, time.monotonic(), output_kind, slo, arrival
            )
        )
        try:
            error = await added
        except BaseException:
            stream.abort()  # cancelled while being added: it may have been added already
            raise
        if error is not None:
            stream._close()
            raise error
        return stream

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        output_kind: OutputKind = OutputKind.DELTA,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs; aborts it if the consumer stops early or is cancelled."""
        stream = await self.add_request(request_id, prompt, params, priority, output_kind)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop accepting; let in-flight requests finish until the deadline, abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            if not self._open_streams:
                break
            await asyncio.sleep(0.02)
        self._post(_Stop("the server is shutting down"))
        await asyncio.to_thread(self._thread.join, 5.0)

    def close(self) -> None:
        """Synchronous stop for non-async callers: abort everything and end the loop thread."""
        self._accepting = False
        self._post(_Stop("the engine was closed"))
        self._thread.join(5.0)

    def _request_abort(self, stream: RequestStream) -> None:
        self._post(_Abort(stream))

    def _post(self, command: object) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # ---- loop thread -------------------------------------------------------------------

    def _run_loop(self, build) -> None:
        if build is not None:
            try:
                self.engine = build()
            except BaseException as exc:
                self._build_error = exc
                self._accepting = False
                self._built.set()
                return
        self._built.set()
        try:
            while True:
                start = time.perf_counter()
                self._wakeup.clear()
                if not self._drain_commands():
                    return
                if not self.engine.has_unfinished_requests():
                    self._snapshot()
                    self._on_idle()
                    self._wakeup.wait()
                    continue
                if self._step():
                    self._loop_time_total_s += time.perf_counter() - start
                    self._heap.after_step()
        except BaseException:  # pragma: no cover - a bug in this loop itself, not a request
            logger.exception("the engine loop stopped")
            self._fail_all(EngineStoppedError("the engine loop stopped unexpectedly"))
        finally:
            self._accepting = False
            self._snapshot(is_running=False)

    def _on_idle(self) -> None:
        self._heap.on_idle()
        if self.idle_hook is None:
            return
        try:
            self.idle_hook()
        except Exception:  # noqa: BLE001 - a hook must never stop the loop
            logger.exception("the engine's idle hook failed")

    def _drain_commands(self) -> bool:
        """Apply every pending command; False when the loop must stop."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            if isinstance(command, _Add):
                self._apply_add(command)
            elif isinstance(command, _Abort):
                self._apply_abort(command.stream)
            elif isinstance(command, _Stop):
                self._fail_all(EngineStoppedError(command.reason))
                return False

    def _apply_add(self, command: _Add) -> None:
        stream = command.stream
        error: BaseException | None = None
        if stream.finished:
            return  # aborted before the loop thread saw it
        if stream.request_id in self._tracks:
            error = InvalidRequestError(f"request id {stream.request_id!r} is already in use")
        else:
            try:
                self.engine.add_request(
                    stream.request_id,
                    command.prompt,
                    command.params,
                    priority=command.priority,
                    arrival_time=command.arrival_time,
                    output_kind=command.output_kind,
                    slo=command.slo,
                )
                self._tracks[stream.request_id] = StreamTrack(
                    stream, command.arrival, output_kind=command.output_kind
                )
                if command.output_kind != OutputKind.FINAL_ONLY:  # a stream: paced delivery?
                    pace_s = self.engine.delivery_pace_s(stream.request_id)
                    stream.set_pace(pace_s, command.output_kind == OutputKind.DELTA)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, who raises it
                error = exc
        _call_in_loop(stream._loop, _resolve, command.added, error)

    def _apply_abort(self, stream: RequestStream) -> None:
        track = self._tracks.get(stream.request_id)
        if track is None or track.stream is not stream:
            return  # already finished, or another request with the same id
        del self._tracks[stream.request_id]
        try:
            self.engine.abort_request(stream.request_id)
        except Exception:  # noqa: BLE001
            logger.exception("aborting request %s failed", stream.request_id)
        self._latency.on_finished("abort", track)

    def _fail_all(self, error: BaseException) -> None:
        tracks, self._tracks = self._tracks, {}
        for request_id, track in tracks.items():
            try:
                self.engine.abort_request(request_id)
            except Exception:  # noqa: BLE001
                logger.exception("aborting request %s failed", request_id)
            self._latency.on_finished("abort", track)
            _call_in_loop(track.stream._loop, track.stream._put, error)

    def _step(self) -> bool:
        """One engine step and its outputs handed out; True when it ran the model."""
        engine = self.engine
        steps_before = self._stats.engine.num_model_steps
        start = time.perf_counter()
        try:
            outputs = engine.step()
        except Exception as exc:  # noqa: BLE001 - the loop must outlive any one step
            logger.exception("engine step failed; failing the requests in flight")
            self._fail_all(EngineInternalError(f"internal error in the engine step: {exc}"))
            return False
        finally:
            self._step_time_total_s += time.perf_counter() - start
        self._dispatch(outputs)
        self._snapshot()
        ran = self._stats.engine.num_model_steps != steps_before
        if not outputs and not ran:
            self._wakeup.wait(_NO_PROGRESS_BACKOFF_S)
        return ran

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their streams: one call_soon_threadsafe per event loop per step."""
        now = time.monotonic()
        batches: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        for output in outputs:
            track = self._tracks.get(output.request_id)
            if track is None:
                continue
            self._latency.on_output(track, output, now)
            if output.finished:
                del self._tracks[output.request_id]
                reason = output.outputs[0].finish_reason if output.outputs else "stop"
                self._latency.on_finished(reason or "stop", track, now)
            batches.setdefault(track.stream._loop, []).append((track.stream, output))
        for loop, batch in batches.items():
            if not _call_in_loop(loop, _deliver, batch):
                for stream, _ in batch:  # its event loop is gone: nobody will read these
                    self._apply_abort(stream)

    def _snapshot(self, is_running: bool = True) -> None:
        self._stats = ServingStats(
            engine=self.engine.stats(),
            num_streams=len(self._tracks),
            step_time_total_s=self._step_time_total_s,
            loop_time_total_s=self._loop_time_total_s,
            is_running=is_running,
        )


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():
        future.set_result(error)


def _deliver(batch: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, output in batch:
        stream._put(output)


def _call_in_loop(loop: asyncio.AbstractEventLoop, func, *args) -> bool:
    try:
        loop.call_soon_threadsafe(func, *args)
    except RuntimeError:  # the event loop is closed
        return False
    return True
