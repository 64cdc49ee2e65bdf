"""Streaming detokenization: token ids in, newly completed text out, O(1) work per token.

Decoding the whole output after every token costs O(n) per token. Instead (as vLLM and TGI
do) we decode only a short window of recent ids twice, with and without the new ones, and
emit the difference:

    ids:   (dropped) | context: text already emitted | read_offset: unread ids | end
    delta = decode(context + unread)  minus  decode(context)

The context tokens make the decoders that look at neighbours (SentencePiece dropping the
space of a sequence's first "▁" token, ByteFallback joining <0xXX> runs) treat the window's
first new token as they would in the full text. A window whose text ends in U+FFFD is a
character still missing bytes: the text before it is emitted, the tokens stay unread, and
the character follows once later tokens complete it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenmill.tokenizer.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as context for the first output token, and how much further back we may
# look for a context start that is not in the middle of a character.
_PROMPT_CONTEXT = 5
_MAX_EXTRA_CONTEXT = 8


class IncrementalDetokenizer:
    """Turns one request's generated ids into text deltas; `.text` is all text emitted so far.

    `add_tokens(ids)` returns only text that is complete. Held-back bytes of an unfinished
    character are returned by a later call, or by `flush()` when the stream ends.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        tail = list(prompt_token_ids[-(_PROMPT_CONTEXT + _MAX_EXTRA_CONTEXT) :])
        # The window: ids[:read_offset] is context whose text was already emitted (or is the
        # prompt's), ids[read_offset:] are generated ids not yet fully emitted.
        self._ids = tail[self._context_start(tail) :]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        # Characters of the unread tokens' text already emitted (before a partial character).
        self._num_pending_chars = 0
        self._pieces: list[str] = []
        self._text: str | None = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _context_start(self, ids: list[int]) -> int:
        # A context that starts inside a character decodes to a leading U+FFFD, and a byte
        # fallback run starting there would never decode cleanly; start a little earlier.
        start = max(len(ids) - _PROMPT_CONTEXT, 0)
        while start > 0 and self._decode(ids[start:]).startswith(REPLACEMENT_CHAR):
            start -= 1
        return start

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = "".join(self._pieces)
        return self._text

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Append generated ids; return the newly completed text ("" while a char is partial)."""
        if not new_ids:
            return ""
        self._ids.extend(new_ids)
        window_text = self._decode(self._ids)
        if len(window_text) <= len(self._prefix_text) + self._num_pending_chars:
            return ""  # e.g. a skipped special token: keep the context that has text
        if not window_text.endswith(REPLACEMENT_CHAR):
            return self._emit(window_text, advance=True)
        # Emit what precedes the unfinished character; its tokens stay unread.
        return self._emit(window_text.rstrip(REPLACEMENT_CHAR), advance=False)

    def flush(self) -> str:
        """At end of stream: emit whatever was held back, even an incomplete character."""
        if self._read_offset == len(self._ids):
            return ""
        return self._emit(self._decode(self._ids), advance=True)

    def _emit(self, window_text: str, advance: bool) -> str:
        start = len(self._prefix_text) + self._num_pending_chars
        delta = window_text[start:]
        if advance:
            # The ids just read become the next window's context; older ones are dropped.
            del self._ids[: self._read_offset]
            self._read_offset = len(self._ids)
            self._prefix_text = self._decode(self._ids)
            self._num_pending_chars = 0
        else:
            self._num_pending_chars += len(delta)
        if delta:
            self._pieces.append(delta)
            self._text = None
        return delta
