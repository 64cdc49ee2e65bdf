"""The route table: every endpoint the server answers, each a thin call into its handler."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from tokenmill.server.chat import create_chat_completion
from tokenmill.server.completions import create_completion
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from tokenmill.server.state import get_state, is_started

_ERRORS = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "invalid request (values, types, JSON, context length)"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "request body too large"),
        (429, "waiting queue full"),
        (503, "starting, or shutting down"),
    )
}
_STREAM = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE if stream"}}

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    if not is_started(request):
        return JSONResponse({"status": "starting"}, status_code=503)
    state = get_state(request)
    if not state.engine.is_running:
        return APIError(503, "the engine is not running", None, "shutting_down").response()
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(request)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    get_state(request).check_model(model_id)
    return _model_card(request)


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**_ERRORS, **_STREAM},
)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await create_completion(body, request)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**_ERRORS, **_STREAM},
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await create_chat_completion(body, request)


def _model_card(request: Request) -> ModelCard:
    state = get_state(request)
    return ModelCard(
        id=state.config.model_name, root=state.model_root, max_model_len=state.max_model_len
    )
