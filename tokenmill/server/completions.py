"""POST /v1/completions: one or more prompts in, text out (whole, or streamed as SSE)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from tokenmill.engine.async_engine import RequestStream
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.server.guided import request_grammar, with_grammar
from tokenmill.server.logprobs import CompletionLogprobsBuilder
from tokenmill.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from tokenmill.server.sampling import (
    check_common,
    check_completion_options,
    check_queue_fits,
    completion_prompts,
    resolve_max_tokens,
    sampling_params,
)
from tokenmill.server.state import ServerState, get_state
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


@dataclass
class _Job:
    """One completion request as the engine sees it."""

    state: ServerState
    body: CompletionRequest
    request_id: str
    created: int
    prompts: list[tuple[str | None, list[int]]]

    @property
    def is_scoring(self) -> bool:
        """max_tokens 0 with echo: the prompt (and its logprobs) only. One token is generated,
        since the engine always samples one, and dropped here."""
        return self.body.echo and self.body.max_tokens == 0

    def choice_index(self, prompt_idx: int, output: CompletionOutput) -> int:
        return prompt_idx * self.body.n + output.index

    def prompt_text(self, prompt_idx: int) -> str:
        text, token_ids = self.prompts[prompt_idx]
        if text is not None:
            return text
        tokenizer = self.state.tokenizer
        return tokenizer.decode(token_ids, skip_special_tokens=False) if tokenizer else ""

    def usage(self, num_completion_tokens: int) -> UsageInfo:
        prompt = sum(len(ids) for _, ids in self.prompts)
        completion = num_completion_tokens
        return UsageInfo(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    check_common(body, state)
    check_completion_options(body)
    prompts = await asyncio.to_thread(completion_prompts, body, state)
    check_queue_fits(body, state, len(prompts))
    echo_logprobs = body.logprobs if body.echo else None
    grammar = request_grammar(body) or (None, None)
    params = [
        await with_grammar(
            sampling_params(
                body,
                resolve_max_tokens(
                    body.max_tokens, len(ids), state.max_model_len, allow_zero=body.echo
                ),
                body.logprobs,
                prompt_logprobs=echo_logprobs,
            ),
            *grammar,
            state,
        )
        for _, ids in prompts
    ]
    job = _Job(state, body, f"cmpl-{uuid.uuid4().hex}", int(time.time()), prompts)
    streams = await add_all(
        state.engine,
        job.request_id,
        [ids for _, ids in prompts],
        params,
        body.priority,
        body.stream,
        body.slo.to_slo() if body.slo else None,
        received_at(request),
    )
    if body.stream:
        return EventStreamResponse(_events(job, streams), streams)
    try:
        finals = await final_outputs(request, streams)
    except ClientDisconnected:
        return Response(status_code=499)
    choices = [
        _final_choice(job, prompt_idx, out, o)
        for prompt_idx, out in enumerate(finals)
        for o in out.outputs
    ]
    response = CompletionResponse(
        id=job.request_id,
        created=job.created,
        model=state.config.model_name,
        choices=choices,
        usage=job.usage(
            0 if job.is_scoring else sum(len(o.token_ids) for out in finals for o in out.outputs)
        ),
    )
    return Response(response.model_dump_json(), media_type="application/json")


def _final_choice(job: _Job, prompt_idx: int, out: RequestOutput, o: CompletionOutput):
    raise_if_failed(o)
    if job.is_scoring:
        o = _scoring_output(o)
    text = o.text
    logprobs = None
    if job.body.logprobs is not None:
        builder = CompletionLogprobsBuilder(job.state.tokenizer)
        logprobs = CompletionLogprobs()
        if job.body.echo:
            logprobs = _prompt_logprobs(builder, out)
        _extend(logprobs, builder.build(o.token_ids, o.logprobs or []))
    if job.body.echo:
        text = job.prompt_text(prompt_idx) + text
    return CompletionChoice(
        index=job.choice_index(prompt_idx, o),
        text=text,
        logprobs=logprobs,
        finish_reason=o.finish_reason,
        stop_reason=o.stop_reason if o.finish_reason == "stop" else None,
    )


async def _events(job: _Job, streams: list[RequestStream]) -> AsyncIterator[str]:
    body = job.body
    builders: dict[int, CompletionLogprobsBuilder] = {}
    num_completion_tokens = 0  # outputs are deltas: their token counts add up
    # Delta outputs carry prompt logprobs once; a choice that starts later still echoes them.
    prompt_logprobs: dict[int, list] = {}
    try:
        async with contextlib.aclosing(merged(streams)) as outputs:
            async for prompt_idx, out in outputs:
                if out.prompt_logprobs is not None:
                    prompt_logprobs[prompt_idx] = out.prompt_logprobs
                out.prompt_logprobs = prompt_logprobs.get(prompt_idx)
                for o in out.outputs:
                    num_completion_tokens += 0 if job.is_scoring else len(o.token_ids)
                    chunk = _chunk_choice(job, prompt_idx, out, o, builders)
                    if chunk is not None:
                        yield sse(
                            CompletionChunk(
                                id=job.request_id,
                                created=job.created,
                                model=job.state.config.model_name,
                                choices=[chunk],
                            )
                        )
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = job.usage(num_completion_tokens)
            yield sse(
                CompletionChunk(
                    id=job.request_id,
                    created=job.created,
                    model=job.state.config.model_name,
                    choices=[],
                    usage=usage,
                )
            )
    except Exception as exc:  # noqa: BLE001 - after the 200 headers: an error event
        yield sse_error(exc)
    yield DONE


def _chunk_choice(
    job: _Job,
    prompt_idx: int,
    out: RequestOutput,
    o: CompletionOutput,
    builders: dict[int, CompletionLogprobsBuilder],
) -> CompletionChoice | None:
    """This step's piece of one choice (`o` is a delta), or None when it has nothing new."""
    raise_if_failed(o)
    if job.is_scoring:
        o = _scoring_output(o)
    index = job.choice_index(prompt_idx, o)
    has_new = bool(o.token_ids) or o.finish_reason is not None
    is_first = index not in builders and has_new
    want_logprobs = job.body.logprobs is not None
    if is_first:
        builders[index] = CompletionLogprobsBuilder(job.state.tokenizer)
    text = o.text
    logprobs = None
    if is_first and job.body.echo:
        text = job.prompt_text(prompt_idx) + text
        if want_logprobs:
            logprobs = _prompt_logprobs(builders[index], out)
    if want_logprobs and index in builders and o.token_ids:
        logprobs = logprobs or CompletionLogprobs()
        _extend(logprobs, builders[index].build(o.token_ids, o.logprobs or []))
    if not text and logprobs is None and o.finish_reason is None:
        return None
    return CompletionChoice(
        index=index,
        text=text,
        logprobs=logprobs,
        finish_reason=o.finish_reason,
        stop_reason=o.stop_reason if o.finish_reason == "stop" else None,
    )


def _scoring_output(o: CompletionOutput) -> CompletionOutput:
    finish = "length" if o.finish_reason is not None else None
    return dataclasses.replace(
        o, text="", token_ids=[], logprobs=None, finish_reason=finish, stop_reason=None
    )


def _prompt_logprobs(builder: CompletionLogprobsBuilder, out: RequestOutput) -> CompletionLogprobs:
    entries = list(out.prompt_logprobs or [])
    entries += [None] * (len(out.prompt_token_ids) - len(entries))
    return builder.build(out.prompt_token_ids, entries)


def _extend(target: CompletionLogprobs, more: CompletionLogprobs) -> None:
    target.tokens += more.tokens
    target.token_logprobs += more.token_logprobs
    target.top_logprobs += more.top_logprobs
    target.text_offset += more.text_offset
