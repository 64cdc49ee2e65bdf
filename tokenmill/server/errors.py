"""The one place where exceptions become OpenAI-style error JSON.

    {"error": {"message": "...", "type": "...", "param": "...", "code": "..."}}

    400 invalid_request_error   bad values or types, malformed JSON, prompt + max_tokens > context
    401 invalid_request_error   missing or wrong API key (code invalid_api_key)
    404 invalid_request_error   unknown model (code model_not_found) or route
    405 invalid_request_error   wrong method on a route
    413 invalid_request_error   body over --max-body-bytes (code request_too_large)
    429 rate_limit_error        waiting queue full (code queue_full)
    500 server_error            a fault while serving this one request
    503 server_error            shutting down (code shutting_down)

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
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


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
    got = json.dumps(first.get("input"), default=str)
    got = got if len(got) <= 80 else got[:77] + "..."
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    message = f"invalid value for '{param}': {first.get('msg')}, got {got}{more}"
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


def _loc_to_param(loc: list) -> str:
    # Union members appear in pydantic's path ("str", "list[int]"); they are not fields.
    parts = [p for p in loc if isinstance(p, int) or not _TYPE_NAME.match(str(p))]
    out = str(parts[0]) if parts else "body"
    for part in parts[1:]:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


_TYPE_NAME = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|.*\[.*\]|function-.*)$")
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
