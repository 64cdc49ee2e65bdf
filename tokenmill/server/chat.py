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
from tokenmill.server.errors import APIError
from tokenmill.server.guided import request_grammar, with_grammar
from tokenmill.server.logprobs import chat_logprobs
from tokenmill.server.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    UsageInfo,
)
from tokenmill.server.protocol_tools import FunctionCallDelta, ToolCallDelta
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
    received_at,
    sse,
    sse_error,
)
from tokenmill.server.tool_calls import (
    ToolCallStream,
    parse_reply,
    tool_call_grammar,
    tool_choice_mode,
)
from tokenmill.structured.grammar import Grammar
from tokenmill.tokenizer.chat_template import with_end_of_turn


@dataclass
class _Job:
    request_id: str
    created: int
    model: str
    num_prompt_tokens: int
    num_top_logprobs: int | None  # None: no logprobs
    tool_mode: str = "none"  # "none", "auto", "required" or the function that must be called
    parallel_tool_calls: bool = True
    keeps_stop_text: bool = False  # include_stop_str_in_output

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

    def logprobs(self, o: CompletionOutput) -> ChatChoiceLogprobs | None:
        """Logprobs of the tokens of the message: not of a stop token that ended it (like EOS,
        it is not part of the content), so the entries join to the content."""
        if self.num_top_logprobs is None:
            return None
        token_ids, entries = o.token_ids, o.logprobs or []
        ended_by_token = o.finish_reason == "stop" and not isinstance(o.stop_reason, str)
        if ended_by_token and not self.keeps_stop_text and token_ids:
            token_ids, entries = token_ids[:-1], entries[: len(token_ids) - 1]
        return chat_logprobs(token_ids, entries, self.num_top_logprobs)

    @property
    def is_call_forced(self) -> bool:
        return self.tool_mode not in ("none", "auto")

    def finish_reason(self, o: CompletionOutput, num_calls: int) -> str | None:
        is_named = self.tool_mode not in ("none", "auto", "required")
        if num_calls and o.finish_reason == "stop" and not is_named:
            return "tool_calls"
        return o.finish_reason


async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    check_common(body, state)
    num_top = chat_num_top_logprobs(body)
    job = _Job(
        f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.config.model_name, 0, num_top,
        tool_choice_mode(body), body.parallel_tool_calls, body.include_stop_str_in_output,
    )  # fmt: skip
    grammar = _grammar(body)
    prompt = await asyncio.to_thread(chat_prompt, body, state)
    job.num_prompt_tokens = len(prompt)
    if body.max_completion_tokens is not None:
        requested, field = body.max_completion_tokens, "max_completion_tokens"
    else:
        requested, field = body.max_tokens, "max_tokens"
    max_tokens = resolve_max_tokens(requested, len(prompt), state.max_model_len, field)
    params = with_end_of_turn(sampling_params(body, max_tokens, num_top), state.tokenizer)
    params = await with_grammar(params, *grammar, state)
    streams = await add_all(
        state.engine, job.request_id, [prompt], [params], body.priority, body.stream,
        body.slo.to_slo() if body.slo else None, received_at(request),
    )  # fmt: skip
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStreamResponse(_events(job, streams, include_usage), streams)
    try:
        (final,) = await final_outputs(request, streams)
    except ClientDisconnected:
        return Response(status_code=499)
    response = ChatCompletionResponse(
        id=job.request_id,
        created=job.created,
        model=job.model,
        choices=[_final_choice(job, o) for o in final.outputs],
        usage=job.usage(sum(len(o.token_ids) for o in final.outputs)),
    )
    return Response(response.model_dump_json(), media_type="application/json")


def _grammar(body: ChatCompletionRequest) -> tuple[Grammar | None, str | None]:
    requested = request_grammar(body)
    tool_grammar = tool_call_grammar(body)
    if requested is not None and tool_grammar is not None:
        raise APIError(
            400, f"{requested[1]} cannot be combined with a tool_choice that forces a call",
            "tool_choice",
        )  # fmt: skip
    if tool_grammar is not None:
        return tool_grammar, "tools"
    return requested if requested is not None else (None, None)


def _final_choice(job: _Job, o: CompletionOutput) -> ChatCompletionChoice:
    raise_if_failed(o)
    message = ChatResponseMessage(content=o.text)
    num_calls = 0
    if job.tool_mode != "none":
        reply = parse_reply(o.text, job.parallel_tool_calls)
        num_calls = len(reply.tool_calls)
        content = None if job.is_call_forced else reply.content
        message = ChatResponseMessage(content=content, tool_calls=reply.tool_calls or None)
    return ChatCompletionChoice(
        index=o.index,
        message=message,
        logprobs=job.logprobs(o),
        finish_reason=job.finish_reason(o, num_calls),
        stop_reason=o.stop_reason if o.finish_reason == "stop" else None,
    )


async def _events(
    job: _Job, streams: list[RequestStream], include_usage: bool
) -> AsyncIterator[str]:
    started: set[int] = set()
    tool_streams: dict[int, ToolCallStream] = {}
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
                    choice = _stream_choice(job, o, tool_streams)
                    if choice is not None:
                        yield job.chunk([choice])
        if include_usage:
            yield job.chunk([], usage=job.usage(num_completion_tokens))
    except Exception as exc:  # noqa: BLE001 - after the 200 headers: an error event
        yield sse_error(exc)
    yield DONE


def _stream_choice(
    job: _Job, o: CompletionOutput, tool_streams: dict[int, ToolCallStream]
) -> ChatStreamChoice | None:
    logprobs = job.logprobs(o) if o.token_ids else None
    if logprobs is not None and not logprobs.content and o.finish_reason is not None:
        logprobs = None  # only the stop token was new
    text, calls, num_calls = o.text, [], 0
    if job.tool_mode != "none":
        stream = tool_streams.setdefault(o.index, ToolCallStream(job.parallel_tool_calls))
        text, calls = stream.feed(o.text)
        if o.finish_reason is not None:
            rest, more = stream.finish()
            text, calls = text + rest, calls + more
        num_calls = stream.num_calls
        text = "" if job.is_call_forced else text
    deltas = [
        ToolCallDelta(
            index=num_calls - len(calls) + i,
            id=call.id,
            type="function",
            function=FunctionCallDelta(name=call.function.name, arguments=call.function.arguments),
        )  # fmt: skip
        for i, call in enumerate(calls)
    ]
    finish_reason = job.finish_reason(o, num_calls)
    if not text and logprobs is None and finish_reason is None and not deltas:
        return None
    return ChatStreamChoice(
        index=o.index,
        delta=DeltaMessage(content=text or None, tool_calls=deltas or None),
        logprobs=logprobs,
        finish_reason=finish_reason,
        stop_reason=o.stop_reason if o.finish_reason == "stop" else None,
    )
