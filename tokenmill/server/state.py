"""What the route handlers share: the engine, the served model's facts, the server settings."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import ServerMetrics

DEFAULT_MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class ServerConfig:
    """Server-only settings (the engine has its own EngineConfig)."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # SIGTERM: in-flight requests may finish for this long; then they are aborted.
    shutdown_timeout_s: float = 10.0
    # Bound on n (samples per prompt) and on prompts per completion request.
    max_n: int = 128
    max_prompts: int = 64
    # The engine's waiting-queue bound (--max-queue): a request of more samples never fits.
    max_queue: int | None = None
    # Slow clients: the request line and headers, then the body, must arrive within these.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # Open connections beyond this are closed on accept (each holds a socket and a buffer).
    max_connections: int = 1024


@dataclass
class ServerState:
    engine: AsyncEngine
    config: ServerConfig
    metrics: ServerMetrics
    tokenizer: object | None
    max_model_len: int
    model_root: str | None

    def check_model(self, model: str | None) -> None:
        """404 unless `model` is unset or names the served model."""
        if model is not None and model != self.config.model_name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves "
                f"'{self.config.model_name}'",
                "model",
                "model_not_found",
            )


def is_started(request: Request) -> bool:
    """False while the app waits for its engine (native kernels compiling, model loading)."""
    return request.app.state.tokenmill is not None


def get_state(request: Request) -> ServerState:
    state = request.app.state.tokenmill
    if state is None:
        raise APIError(
            503,
            "the server is starting (compiling native kernels, loading the model); "
            "retry when /health answers 200",
            None,
            "server_starting",
        )
    return state
