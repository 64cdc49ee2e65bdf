"""From an OpenAI request body to what the engine takes: prompt token ids and SamplingParams.

The engine caps generation at the context window silently, so the server checks
prompt + max_tokens against it here and says both numbers when they do not fit.
"""

from __future__ import annotations

from tokenmill.engine.limits import check_request_fits
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingRequest,
)
from tokenmill.server.state import ServerState
from tokenmill.server.tool_calls import message_dict, prompt_inputs
from tokenmill.tokenizer.chat_template import template_variables

# Names chat_template_kwargs may not use: the variables the server sets itself, and the
# renderer's own parameters.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "add_generation_prompt", "tokenize", "tools", "chat_template", "template",
     "self", "kwargs"}
)  # fmt: skip


def sampling_params(
    body: SamplingRequest,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """SamplingParams for `body`; raises InvalidRequestError naming any bad value."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    return SamplingParams(
        n=body.n,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        min_p=0.0 if body.min_p is None else body.min_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=tuple(stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        include_stop_str_in_output=body.include_stop_str_in_output,
        ignore_eos=body.ignore_eos,
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=body.skip_special_tokens,
    )


def check_common(body: SamplingRequest, state: ServerState) -> None:
    """Checks the engine cannot make: the model name, unsupported features, size bounds."""
    state.check_model(body.model)
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", "logit_bias")
    if body.n > state.config.max_n:
        raise APIError(400, f"n must be at most {state.config.max_n}, got {body.n}", "n")
    check_queue_fits(body, state)


def check_queue_fits(body: SamplingRequest, state: ServerState, num_prompts: int = 1) -> None:
    """400, not 429: a request of more samples than the waiting queue holds never fits."""
    max_queue = state.config.max_queue
    if max_queue is not None and body.n * num_prompts > max_queue:
        what = f"n ({body.n})" if num_prompts == 1 else f"n x prompts ({body.n * num_prompts})"
        raise APIError(
            400, f"{what} is more than this server's queue holds ({max_queue}: --max-queue)", "n"
        )


def resolve_max_tokens(
    requested: int | None,
    prompt_len: int,
    max_model_len: int,
    field: str = "max_tokens",
    allow_zero: bool = False,
) -> int:
    """The number of tokens to generate: `requested`, or what is left of the context if None.
    `allow_zero` (echo: prompt scoring) lets 0 through, as 1 token the caller then drops."""
    if requested == 0 and allow_zero:
        requested = 1
    if requested is not None and requested < 1:
        raise APIError(400, f"{field} must be at least 1, got {requested}", field)
    return check_request_fits(prompt_len, requested, max_model_len, field)


# ---- /v1/completions -----------------------------------------------------------------------


def completion_prompts(
    body: CompletionRequest, state: ServerState
) -> list[tuple[str | None, list[int]]]:
    """The request's prompts as (text or None, token ids): a string, strings, token ids, or
    lists of token ids."""
    prompt = body.prompt
    if prompt is None:
        return [(None, [_document_boundary(state)])]
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt is empty: send a string or a list of token ids", "prompt")
    if len(prompts) > state.config.max_prompts:
        raise APIError(
            400,
            f"prompt has {len(prompts)} entries; at most {state.config.max_prompts} per request",
            "prompt",
        )
    out = []
    for idx, p in enumerate(prompts):
        if not p:
            where = "prompt" if len(prompts) == 1 else f"prompt[{idx}]"
            raise APIError(400, f"{where} is empty", "prompt")
        out.append((p, _encode(state, p)) if isinstance(p, str) else (None, list(p)))
    return out


def check_completion_options(body: CompletionRequest) -> None:
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(
            400, f"best_of ({body.best_of}) must equal n ({body.n}) on this server", "best_of"
        )
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server", "suffix")


# ---- /v1/chat/completions ------------------------------------------------------------------


def chat_prompt(body: ChatCompletionRequest, state: ServerState) -> list[int]:
    """The conversation (and its tools) through the model's chat template, as token ids."""
    if not body.messages:
        raise APIError(400, "messages is empty: send at least one message", "messages")
    if state.tokenizer is None or state.tokenizer.chat_template is None:
        raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
    extra = dict(body.chat_template_kwargs or {})
    reserved = sorted(k for k in extra if k in _RESERVED_TEMPLATE_KWARGS or not k.isidentifier())
    if reserved:
        raise APIError(
            400,
            f"chat_template_kwargs may not set {', '.join(repr(k[:40]) for k in reserved[:5])}: "
            "the server sets these (or they are not variable names)",
            "chat_template_kwargs",
        )
    messages = [_message_dict(m, idx) for idx, m in enumerate(body.messages)]
    has_native_tools = "tools" in template_variables(state.tokenizer.chat_template)
    messages, tool_variables = prompt_inputs(body, messages, has_native_tools)
    return list(
        state.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=body.add_generation_prompt,
            tokenize=True,
            **extra,
            **tool_variables,
        )
    )


def chat_num_top_logprobs(body: ChatCompletionRequest) -> int | None:
    """SamplingParams.logprobs for a chat request: None, or how many alternatives per token."""
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    if not body.logprobs:
        return None
    top = body.top_logprobs or 0
    if not 0 <= top <= 20:
        raise APIError(400, f"top_logprobs must be in [0, 20], got {top}", "top_logprobs")
    return top


def _message_dict(message: ChatMessage, idx: int) -> dict:
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise APIError(
                    400,
                    f"messages[{idx}].content: only text parts are supported, got '{part.type}'",
                    f"messages[{idx}].content",
                )
            texts.append(part.text)
        content = "".join(texts)
    if content is None and not (message.role == "assistant" and message.tool_calls):
        raise APIError(
            400, f"messages[{idx}].content is required for a {message.role} message",
            f"messages[{idx}].content",
        )  # fmt: skip
    return message_dict(message, content)


def _document_boundary(state: ServerState) -> int:
    """OpenAI's default prompt (null): `<|endoftext|>`, the token a document starts after."""
    tokenizer = state.tokenizer
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send token ids as the prompt", "prompt")
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.eos_token_ids[0]


def _encode(state: ServerState, text: str) -> list[int]:
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: send token ids as the prompt", "prompt")
    return list(state.tokenizer.encode(text))
