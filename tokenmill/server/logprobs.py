"""Engine logprobs (one {token_id: Logprob} dict per token) in the two OpenAI shapes.

completions: {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{tok: lp}], "text_offset"}
chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", ...}]}]}
"""

from __future__ import annotations

import math

from tokenmill.outputs import Logprob
from tokenmill.server.protocol import (
    ChatChoiceLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    TopLogprob,
)

# JSON has no -inf; a token the sampler masked out gets this instead (as vLLM does).
_MIN_LOGPROB = -9999.0


class CompletionLogprobsBuilder:
    """Accumulates completion logprobs; text offsets continue across streamed chunks."""

    def __init__(self, tokenizer, text_offset: int = 0) -> None:
        self._tokenizer = tokenizer
        self.text_offset = text_offset

    def build(
        self, token_ids: list[int], entries: list[dict[int, Logprob] | None]
    ) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries, strict=False):
            chosen = entry.get(token_id) if entry else None
            token = self._token_text(token_id, chosen)
            out.tokens.append(token)
            out.token_logprobs.append(_finite(chosen.logprob) if chosen else None)
            out.top_logprobs.append(
                {self._token_text(t, lp): _finite(lp.logprob) for t, lp in _by_rank(entry)}
                if entry
                else None
            )
            out.text_offset.append(self.text_offset)
            self.text_offset += len(token)
        return out

    def _token_text(self, token_id: int, logprob: Logprob | None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        if self._tokenizer is not None:
            return self._tokenizer.decode([token_id], skip_special_tokens=False)
        return f"token_id:{token_id}"


def chat_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], num_top: int
) -> ChatChoiceLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        chosen = entry.get(token_id)
        token = _decoded(token_id, chosen)
        top = [
            TopLogprob(token=_decoded(t, lp), logprob=_finite(lp.logprob), bytes=_bytes(t, lp))
            for t, lp in _by_rank(entry)
            if lp.rank <= num_top
        ]
        content.append(
            ChatTokenLogprob(
                token=token,
                logprob=_finite(chosen.logprob) if chosen else _MIN_LOGPROB,
                bytes=list(token.encode("utf-8")),
                top_logprobs=top[:num_top],
            )
        )
    return ChatChoiceLogprobs(content=content)


def _by_rank(entry: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(entry.items(), key=lambda item: item[1].rank)


def _decoded(token_id: int, logprob: Logprob | None) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return f"token_id:{token_id}"


def _bytes(token_id: int, logprob: Logprob) -> list[int]:
    return list(_decoded(token_id, logprob).encode("utf-8"))


def _finite(value: float) -> float:
    return value if math.isfinite(value) else _MIN_LOGPROB
