"""The context-length rule, stated once: a prompt must leave room for at least one generated
token, and prompt + max_tokens may not pass the context window when a caller asks for that."""

from __future__ import annotations

from tokenmill.errors import ContextLengthError


def check_prompt_fits(prompt_len: int, max_model_len: int) -> None:
    if prompt_len >= max_model_len:
        raise ContextLengthError(
            f"prompt has {prompt_len} tokens but this model's maximum context length is "
            f"{max_model_len} tokens: at most {max_model_len - 1} prompt tokens fit"
        )


def check_request_fits(
    prompt_len: int, max_tokens: int | None, max_model_len: int, field: str = "max_tokens"
) -> int:
    """The number of tokens the request may generate: `max_tokens`, or what is left of the
    context when None. A request that asks for more than fits is refused (OpenAI's rule; the
    offline engine instead ends such outputs at the limit with finish reason "length")."""
    check_prompt_fits(prompt_len, max_model_len)
    if max_tokens is None:
        return max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise ContextLengthError(
            f"{field}: this model's maximum context length is {max_model_len} tokens, but "
            f"{prompt_len + max_tokens} tokens were requested ({prompt_len} in the prompt + "
            f"{max_tokens} for the completion); shorten the prompt or lower {field}"
        )
    return max_tokens
