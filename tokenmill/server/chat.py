"""POST /v1/chat/completions: messages through the chat template, a reply out (whole or SSE)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from tokenmill.engine.async_engine import RequestStream
from tokenmill.outputs import CompletionOutput
from tokenmill.server.logprobs import chat_logprobs
from tokenmill.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    UsageInfo,
)
from tokenmill.server.sampling import (
    chat_num_top_logprobs,
    chat_prompt,
    check_common,
    resolve_max_tokens,
    sampling_params,
)
from tokenmill.server.state import get_state
from tokenmill.server.streaming import (
    DONE,
    ClientDisconnected,
    EventStreamResponse,
    add_all,
    final_outputs,
    merged,
    raise_if_failed,
    sse,
    sse_error,
)
from tokenmill.tokenizer.chat_template import with_end_of_turn


@dataclass
class _Job:
    request_id: str
    created: int
    model: str
    num_prompt_tokens: int
    num_top_logprobs: int | None  # None: no logprobs

    def chunk(self, choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
        return sse(
            ChatCompletionChunk(
                id=self.request_id,
                created=self.created,
                model=self.model,
                choices=choices,
                usage=usage,
            )
        )

    def usage(self, num_completion_tokens: int) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=num_completion_tokens,
            total_tokens=self.num_prompt_tokens + num_completion_tokens,
        )


async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    check_common(body, state)
    num_top = chat_num_top_logprobs(body)
    prompt = await asyncio.to_thread(chat_prompt, body, state)
    if body.max_completion_tokens is not None:
        requested, field = body.max_completion_tokens, "max_completion_tokens"
    else:
        requested, field = body.max_tokens, "max_tokens"
    max_tokens = resolve_max_tokens(requested, len(prompt), state.max_model_len, field)
    params = with_end_of_turn(sampling_params(body, max_tokens, num_top), state.tokenizer)
    job = _Job(
        f"chatcmpl-{uuid.uuid4().hex}",
        int(time.time()),
        state.config.model_name,
        len(prompt),
        num_top,
    )
    streams = await add_all(
        state.engine, job.request_id, [prompt], [params], body.priority, body.stream
    )
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStreamResponse(_events(job, streams, include_usage), streams)
    try:
        (final,) = await final_outputs(request, streams)
    except ClientDisconnected:
        return Response(status_code=499)
    choices = []
    for o in final.outputs:
        raise_if_failed(o)
        logprobs = None
        if num_top is not None:
            logprobs = chat_logprobs(o.token_ids, o.logprobs or [], num_top)
        choices.append(
            ChatCompletionChoice(
                index=o.index,
                message=ChatResponseMessage(content=o.text),
                logprobs=logprobs,
                finish_reason=o.finish_reason,
                stop_reason=o.stop_reason if o.finish_reason == "stop" else None,
            )
        )
    response = ChatCompletionResponse(
        id=job.request_id,
        created=job.created,
        model=job.model,
        choices=choices,
        usage=job.usage(sum(len(o.token_ids) for o in final.outputs)),
    )
    return Response(response.model_dump_json(), media_type="application/json")


async def _events(
    job: _Job, streams: list[RequestStream], include_usage: bool
) -> AsyncIterator[str]:
    started: set[int] = set()
    num_completion_tokens = 0  # outputs are deltas: their token counts add up
    try:
        async with contextlib.aclosing(merged(streams)) as outputs:
            async for _, out in outputs:
                for o in out.outputs:
                    raise_if_failed(o)
                    num_completion_tokens += len(o.token_ids)
                    if o.index not in started:
                        started.add(o.index)
                        delta = DeltaMessage(role="assistant", content="")
                        yield job.chunk([ChatStreamChoice(index=o.index, delta=delta)])
                    choice = _stream_choice(job, o)
                    if choice is not None:
                        yield job.chunk([choice])
        if include_usage:
            yield job.chunk([], usage=job.usage(num_completion_tokens))
    except Exception as exc:  # noqa: BLE001 - after the 200 headers: an error event
        yield sse_error(exc)
    yield DONE


def _stream_choice(job: _Job, o: CompletionOutput) -> ChatStreamChoice | None:
    logprobs = None
    if job.num_top_logprobs is not None and o.token_ids:
        logprobs = chat_logprobs(o.token_ids, o.logprobs or [], job.num_top_logprobs)
    if not o.text and logprobs is None and o.finish_reason is None:
        return None
    return ChatStreamChoice(
        index=o.index,
        delta=DeltaMessage(content=o.text or None),
        logprobs=logprobs,
        finish_reason=o.finish_reason,
        stop_reason=o.stop_reason if o.finish_reason == "stop" else None,
    )
