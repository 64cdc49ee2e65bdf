"""ASGI guards that run before routing: the API key and the body-size limit.

Both answer in the same OpenAI error JSON as route errors (built by server.errors).
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server.errors import APIError

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on /v1/ routes (health and metrics stay open)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization")
        if given is None or not secrets.compare_digest(given, self._expected):
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


class BodyLimitMiddleware:
    """Answers 413 to bodies over `max_body_bytes`, declared or streamed, before any parsing.

    The body is read here in full (routes need all of it anyway) and replayed to the app; later
    receive() calls go to the server, so disconnects are still seen.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

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
        while True:
            message = await receive()
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
        await self.app(scope, _replay(b"".join(chunks), receive), send)

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
