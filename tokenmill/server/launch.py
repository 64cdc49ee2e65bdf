"""Running an app under uvicorn with a graceful, engine-aware shutdown.

SIGTERM / SIGINT
  -> uvicorn stops accepting connections and waits for the open ones
  -> the engine drains: new requests get 503; in-flight ones may finish until the deadline,
     then end with a 'shutting down' error event, so uvicorn's wait ends cleanly
  -> lifespan shutdown (engine thread stopped) -> exit 0
"""

from __future__ import annotations

import asyncio
import signal
import socket

import uvicorn

from tokenmill.server.app import served_engine

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
        engine = served_engine(self.config.app)
        if engine is not None:  # else still starting: nothing in flight
            self._drain = asyncio.ensure_future(engine.shutdown(self._shutdown_timeout_s))


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
