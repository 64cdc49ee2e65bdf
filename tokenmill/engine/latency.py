"""Per-request latency events from the async engine's outputs: time to first token, the time
between tokens, end to end. Runs on the engine's loop thread; observers (the server's metrics)
must be cheap and thread-safe."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tokenmill.outputs import OutputKind, RequestOutput

if TYPE_CHECKING:
    from tokenmill.engine.request_stream import RequestStream

logger = logging.getLogger(__name__)


class RequestObserver(Protocol):
    def on_first_token(self, ttft_s: float) -> None: ...

    def on_inter_token(self, itl_s: float) -> None: ...

    def on_finished(self, finish_reason: str, e2e_s: float) -> None: ...


@dataclass
class StreamTrack:
    """Loop-thread bookkeeping of one stream: where its outputs go and when its tokens came."""

    stream: RequestStream
    arrival: float  # time.monotonic() when the caller asked
    last_token_time: float | None = None
    output_kind: OutputKind = OutputKind.DELTA
    num_output_tokens: int = 0  # the most of any sample's tokens seen in outputs so far


class LatencyReporter:
    def __init__(self) -> None:
        self._observers: tuple[RequestObserver, ...] = ()

    def add(self, observer: RequestObserver) -> None:
        self._observers = (*self._observers, observer)

    def on_output(self, track: StreamTrack, output: RequestOutput, now: float) -> None:
        num_tokens = max((len(o.token_ids) for o in output.outputs), default=0)
        if track.output_kind == OutputKind.DELTA:
            num_new = num_tokens  # the most any sample gained this step
        else:
            num_new = max(num_tokens - track.num_output_tokens, 0)
            track.num_output_tokens = max(track.num_output_tokens, num_tokens)
        if not num_new:
            return
        last, track.last_token_time = track.last_token_time, now
        if last is None:
            self._notify("on_first_token", now - track.arrival)
            return
        # Several tokens in one step (speculative decoding) share the step's time.
        for _ in range(num_new):
            self._notify("on_inter_token", (now - last) / num_new)

    def on_finished(self, reason: str, track: StreamTrack, now: float | None = None) -> None:
        self._notify("on_finished", reason, (now or time.monotonic()) - track.arrival)

    def _notify(self, event: str, *args) -> None:
        for observer in self._observers:
            try:
                getattr(observer, event)(*args)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                logger.exception("request observer %r failed on %s", observer, event)
