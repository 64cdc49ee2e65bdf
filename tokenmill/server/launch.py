"""Running an app under uvicorn with a graceful, engine-aware shutdown.

SIGTERM / SIGINT
  -> uvicorn stops accepting connections and waits for the open ones
  -> the engine drains: new requests get 503; in-flight ones may finish until the deadline,
     then end with a 'shutting down' error event, so uvicorn's wait ends cleanly; a body still
     being read is answered 503 at once (middleware), idle connections are closed
  -> lifespan shutdown (engine thread stopped) -> exit 0

Slow clients are bounded by `GuardedH11Protocol` (request line and headers within a deadline,
a cap on open connections) and the body middleware (the body within a deadline).
"""

from __future__ import annotations

import asyncio
import signal
import socket

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from tokenmill.server.app import served_engine
from tokenmill.server.errors import APIError

# uvicorn's own deadline is only a backstop behind the engine's.
_UVICORN_GRACE_S = 5.0


class DrainingServer(uvicorn.Server):
    """A uvicorn server that starts the engine's drain when it is told to exit."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout_s: float):
        super().__init__(config)
        self._shutdown_timeout_s = shutdown_timeout_s
        self._drain: asyncio.Future | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            # A signal handler runs between bytecodes of the loop's thread: schedule, not await.
            asyncio.get_event_loop().call_soon_threadsafe(self._start_drain)
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self.config.app.state.draining.set()
        engine = served_engine(self.config.app)
        if engine is not None:  # else still starting: nothing in flight
            self._drain = asyncio.ensure_future(engine.shutdown(self._shutdown_timeout_s))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with two guards it lacks: a connection over the cap is
    answered 503 and closed on accept, and a request whose line and headers have not all
    arrived `header_timeout_s` after the connection opened (or after the request's first byte,
    on a kept-alive connection) gets 408 and the connection is closed. An idle kept-alive
    connection is uvicorn's to close (--timeout-keep-alive). The limits come from the app's
    ServerConfig."""

    _header_timer: asyncio.TimerHandle | None = None
    _timer_cycle: object = None  # the request cycle current when the timer was armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        config = self._server_config()
        if len(self.connections) > config.max_connections:
            message = f"too many open connections (at most {config.max_connections})"
            self._refuse(503, APIError(503, message, None, "too_many_connections"))
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        is_between = self.cycle is None or self.cycle.response_complete
        if self._header_timer is None and is_between:
            self._arm_header_timer()
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not self._timer_cycle:
            self._header_timer.cancel()  # the headers are in: a request has started
            self._header_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _server_config(self):
        return self.config.app.state.tokenmill_settings[0]

    def _arm_header_timer(self) -> None:
        self._timer_cycle = self.cycle
        timeout = self._server_config().header_timeout_s
        self._header_timer = self.loop.call_later(timeout, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.cycle is not self._timer_cycle:
            return
        timeout = self._server_config().header_timeout_s
        message = f"the request headers were not received within {timeout:g} s"
        self._refuse(408, APIError(408, message, None, "request_timeout"))

    def _refuse(self, status: int, error: APIError) -> None:
        body = error.body_json().encode()
        reason = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.transport.close()


def run_server(
    app,
    sock: socket.socket,
    *,
    log_level: str = "warning",
    access_log: bool = False,
    shutdown_timeout_s: float = 10.0,
) -> int:
    """Serve `app` (from create_app; it may still be starting) on the bound socket until
    SIGTERM/SIGINT; returns the exit code."""
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=shutdown_timeout_s + _UVICORN_GRACE_S,
        http=GuardedH11Protocol,
    )
    server = DrainingServer(config, shutdown_timeout_s)

    # uvicorn re-raises the signal it caught once it has shut down; with this handler in place
    # that is harmless and the process exits 0. It also stops a server signalled before uvicorn
    # installs its own handlers.
    def request_exit(signum, frame) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, request_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine = served_engine(app)
        if engine is not None:
            engine.close()
    return 0 if server.started else 1
