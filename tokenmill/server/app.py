"""The app factory: an AsyncEngine and a ServerConfig in, a FastAPI app out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.server.errors import install_error_handlers
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.middleware import ApiKeyMiddleware, BodyLimitMiddleware
from tokenmill.server.routes import router
from tokenmill.server.state import ServerConfig, ServerState
from tokenmill.tokenizer.chat_template import end_of_turn_token_ids


def create_app(
    engine: AsyncEngine | None, config: ServerConfig, model_root: str | None = None
) -> FastAPI:
    """An OpenAI-compatible app serving `engine`; the app owns it and shuts it down on exit.

    Without an engine the app is starting: /health answers 503 {"status": "starting"} and
    every other endpoint 503 `server_starting`, until `attach_engine` hands it one."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has already waited (up to its graceful timeout) for open responses; this
        # aborts whatever is left and stops the engine thread.
        engine = served_engine(app)
        if engine is not None:
            await engine.shutdown(config.shutdown_timeout_s)

    app = FastAPI(
        title="tokenmill",
        summary="OpenAI-compatible LLM inference server",
        lifespan=lifespan,
    )
    app.state.tokenmill = None
    app.state.tokenmill_settings = (config, model_root)
    # Set when the server starts to drain (launch.DrainingServer): bodies still being read
    # are answered 503 at once instead of holding up the shutdown.
    app.state.draining = asyncio.Event()
    if engine is not None:
        attach_engine(app, engine)
    app.include_router(router)
    install_error_handlers(app)
    # The last added runs first: the key is checked before a body is read.
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=config.max_body_bytes,
        body_timeout_s=config.body_timeout_s,
        draining=app.state.draining,
    )
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    return app


def attach_engine(app: FastAPI, engine: AsyncEngine) -> None:
    """Serve `engine` from now on (any thread: the state is swapped in whole)."""
    config, model_root = app.state.tokenmill_settings
    if engine.tokenizer is not None and engine.tokenizer.chat_template is not None:
        # Compiles the chat template now (cached), not on the first chat request.
        end_of_turn_token_ids(engine.tokenizer)
    app.state.tokenmill = ServerState(
        engine=engine,
        config=config,
        metrics=ServerMetrics(engine, config.model_name),
        tokenizer=engine.tokenizer,
        max_model_len=engine.max_model_len,
        model_root=model_root,
    )


def served_engine(app: FastAPI) -> AsyncEngine | None:
    """The app's engine; None while it is starting."""
    state = app.state.tokenmill
    return None if state is None else state.engine
