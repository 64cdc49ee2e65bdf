"""ASGI guards that run before routing: the API key, and the body's size and read time.

Both answer in the same OpenAI error JSON as route errors (built by server.errors).
"""

from __future__ import annotations

import asyncio
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server.errors import APIError

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


# Served without the key: probes and scrapers. Everything under /v1 and the API's own
# description (/docs, /redoc, /openapi.json) needs it.
_PROTECTED_PREFIXES = ("/v1", "/docs", "/redoc", "/openapi.json")


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` (the scheme in any case, as RFC 7235 has it) on
    /v1/ routes and the API docs; /health and /metrics stay open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(_PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization")
        if given is None or not self._is_valid(given):
            reason = "no API key given" if given is None else "incorrect API key"
            error = APIError(
                401,
                f"{reason}: send the server's key as 'Authorization: Bearer <key>'",
                None,
                "invalid_api_key",
            )
            await error.response(headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _is_valid(self, given: bytes) -> bool:
        scheme, _, token = given.strip().partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self._expected)


class BodyLimitMiddleware:
    """Answers 413 to bodies over `max_body_bytes`, declared or streamed, before any parsing;
    408 to a body not read in full within `body_timeout_s`; 503 to one still being read when
    the server starts to drain (`draining` is set), so a slow client cannot hold up shutdown.

    The body is read here in full (routes need all of it anyway) and replayed to the app; later
    receive() calls go to the server, so disconnects are still seen.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_timeout_s: float = 30.0,
        draining: asyncio.Event | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.draining = draining or asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(scope, receive, send, int(declared))
            return
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            message = await self._receive_in_time(receive, deadline)
            if isinstance(message, APIError):
                await message.response(headers={"Connection": "close"})(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._reject(scope, receive, send, size, at_least=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        # The request is whole: its latency (and a TTFT promise) counts from here.
        scope.setdefault("state", {})["received_at"] = time.time()
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _receive_in_time(self, receive: Receive, deadline: float) -> Message | APIError:
        if self.draining.is_set():
            return _draining_error()
        received = asyncio.ensure_future(receive())
        drained = asyncio.ensure_future(self.draining.wait())
        try:
            timeout = max(0.0, deadline - time.monotonic())
            await asyncio.wait({received, drained}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            drained.cancel()
            if not received.done():
                received.cancel()
        if received.done() and not received.cancelled():
            return received.result()
        if self.draining.is_set():
            return _draining_error()
        message = f"the request body was not received within {self.body_timeout_s:g} s"
        return APIError(408, message, None, "request_timeout")

    async def _reject(
        self, scope: Scope, receive: Receive, send: Send, size: int, at_least: bool = False
    ) -> None:
        amount = f"at least {size}" if at_least else str(size)
        error = APIError(
            413,
            f"the request body is {amount} bytes, over this server's limit of "
            f"{self.max_body_bytes} bytes",
            None,
            "request_too_large",
        )
        # Close the connection: the rest of the oversized body is never read.
        await error.response(headers={"Connection": "close"})(scope, receive, send)


def _draining_error() -> APIError:
    return APIError(503, "the server is shutting down", None, "shutting_down")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None
