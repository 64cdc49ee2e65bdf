"""The one place where exceptions become OpenAI-style error JSON.

    {"error": {"message": "...", "type": "...", "param": "...", "code": "..."}}

    400 invalid_request_error   bad values or types, malformed JSON, prompt + max_tokens > context
    401 invalid_request_error   missing or wrong API key (code invalid_api_key)
    404 invalid_request_error   unknown model (code model_not_found) or route
    405 invalid_request_error   wrong method on a route
    408 invalid_request_error   headers or body not received in time (code request_timeout)
    413 invalid_request_error   body over --max-body-bytes (code request_too_large)
    429 rate_limit_error        waiting queue full (code queue_full); latency targets that
                                cannot be met now (code slo_unattainable, with Retry-After)
    500 server_error            a fault while serving this one request
    503 server_error            shutting down (code shutting_down), a body still being read
                                when the drain starts, connections over --max-connections
                                (code too_many_connections)

A message echoes at most a short prefix of what the client sent (`_clip`), and is built with
plain string operations in time linear in the error's size: a validation error must never be
a way to stall the event loop.

Route code raises; `install_error_handlers` turns what it raises into a response, and
`error_from_exception` gives the same body for an error that happens mid-stream.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.async_engine import EngineStoppedError
from tokenmill.errors import (
    ContextLengthError,
    EngineOverloadedError,
    InvalidRequestError,
    SloUnattainableError,
    TokenmillError,
)

logger = logging.getLogger(__name__)

_STATUS_TYPES = {500: "server_error", 503: "server_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields, raised by the server's own checks."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers: dict[str, str] | None = None  # e.g. Retry-After

    @property
    def type(self) -> str:
        return _STATUS_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body_json(self) -> str:
        return json.dumps(self.body())

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers or self.headers)


def error_from_exception(exc: BaseException) -> APIError:
    """Map any exception to the APIError a client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(
            400, str(exc), _param_of(str(exc)) or "max_tokens", "context_length_exceeded"
        )
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), _param_of(str(exc)), "invalid_value")
    if isinstance(exc, SloUnattainableError):
        error = APIError(429, f"latency targets unattainable: {exc}", "slo", "slo_unattainable")
        error.headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
        return error
    if isinstance(exc, EngineOverloadedError):
        return APIError(429, f"the server is overloaded: {exc}; retry later", None, "queue_full")
    if isinstance(exc, EngineStoppedError):
        return APIError(503, str(exc), None, "shutting_down")
    logger.error("internal error while serving a request", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", None, None)


def validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic's first complaint, named by the field it is about."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "the request body is invalid")
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "not valid JSON")
        return APIError(400, f"malformed JSON in the request body: {detail}", None, "json_invalid")
    if not loc:
        if first.get("type") == "missing":
            return APIError(400, "the request body is missing: send a JSON object", None)
        message = "the request body must be a JSON object, sent as Content-Type: application/json"
        return APIError(400, message, None, "invalid_type")
    param = _loc_to_param(loc)
    if first.get("type") == "missing":
        return APIError(400, f"'{param}' is required", param, "missing_required_parameter")
    got = _bounded_json(first.get("input"))
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    msg = _clip(str(first.get("msg")), 200)
    message = f"invalid value for '{param}': {msg}, got {got}{more}"
    return APIError(400, message, param, "invalid_type")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    # Expected errors are answered here; anything else (a bug) reaches the catch-all, which
    # answers 500 and lets the server log the traceback.
    app.add_exception_handler(APIError, _on_exception)
    app.add_exception_handler(TokenmillError, _on_exception)
    app.add_exception_handler(Exception, _on_exception)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc).response()


async def _on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    route = f"{request.method} {request.url.path}"
    if exc.status_code == 404 and exc.detail in (None, "Not Found"):
        message, code = f"no such route: {route}", "not_found"
    elif exc.status_code == 405:
        message, code = f"method not allowed: {route}", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    return APIError(exc.status_code, message, None, code).response(headers=exc.headers)


async def _on_exception(request: Request, exc: Exception) -> JSONResponse:
    return error_from_exception(exc).response()


# What an error message may echo of the client's input: a key or a value is cut to this many
# characters, so a 1 MiB key costs one slice, never a scan that grows faster than its length.
_MAX_ECHO = 80
_MAX_PARAM = 200


def _clip(text: str, limit: int = _MAX_ECHO) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bounded_json(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(_clip(value))
    if isinstance(value, dict | list) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    return _clip(json.dumps(value, default=str))


def _loc_to_param(loc: list) -> str:
    # Union members appear in pydantic's path ("str", "list[int]"); they are not fields.
    parts = [_clip(str(p)) if not isinstance(p, int) else p for p in loc]
    parts = [p for p in parts if isinstance(p, int) or not _is_type_name(p)]
    out = str(parts[0]) if parts else "body"
    for part in parts[1:]:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return _clip(out, _MAX_PARAM)


def _is_type_name(part: str) -> bool:
    """pydantic's union-member tags: `str`, `list[int]`, `function-after[...]`, `Model`...
    Plain string operations only: every step is linear in the (client-chosen) part."""
    if part in ("str", "int", "float", "bool", "none", "null") or part.startswith("function-"):
        return True
    if part[:1].isupper() and part.isidentifier():  # a model class; fields are snake_case
        return True
    head, bracket, _ = part.partition("[")
    return bool(bracket) and part.endswith("]") and head.isidentifier()


_FIELD = re.compile(r"^'?([a-z_]+)'?\b")


def _param_of(message: str) -> str | None:
    """The request field an engine message names first ("top_p must be in (0, 1], ...")."""
    from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest

    match = _FIELD.match(message)
    if match is None:
        return None
    name = match.group(1)
    fields = CompletionRequest.model_fields.keys() | ChatCompletionRequest.model_fields.keys()
    return name if name in fields else None
