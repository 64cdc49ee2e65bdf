"""One sample's generated output as it grows: text released in chunks, stop strings matched in
the held-back tail, tokens and logprobs handed to the output that reports them.

Text is stored once. Each new piece from the detokenizer joins the tail; whatever lies more
than (longest stop string - 1) characters from the end can no longer become part of a stop
string, so it is released (reported by the next output). A new match must contain a new
character and is at most `longest` long, so it lies inside tail + piece:

    released chunks (never searched again) | tail (<= longest - 1 chars) | new piece
                                             \\------ searched for stop strings ------/
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.outputs import CompletionOutput, Logprob, OutputKind
from tokenmill.sampling_params import SamplingParams


@dataclass
class SampleText:
    """One of the n samples of a request (one scheduler Request).

    `token_ids`, `logprobs` and `chunks` hold what the next output reports: everything in
    CUMULATIVE and FINAL_ONLY mode, only what is new since the previous output in DELTA mode.
    """

    index: int
    params: SamplingParams
    detokenizer: object | None  # IncrementalDetokenizer; None for token-only models
    kind: OutputKind
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    chunks: list[str] = field(default_factory=list)  # released text
    tail: str = ""  # held back: may be the start of a stop string
    num_output_tokens: int = 0
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    is_finish_reported: bool = False

    def __post_init__(self) -> None:
        stops = self.params.stop
        self._num_held_chars = max(len(s) for s in stops) - 1 if stops else 0
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def has_news(self) -> bool:
        """Something for a DELTA output: new tokens or text, or a finish not yet reported."""
        return bool(self.token_ids or self.chunks) or (
            self.is_finished and not self.is_finish_reported
        )

    def add_token(self, token: int, logprobs: dict[int, Logprob] | None, logprob: float) -> None:
        self.token_ids.append(token)
        self.num_output_tokens += 1
        self.cumulative_logprob += logprob
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)

    def add_text(self, piece: str, can_stop: bool) -> bool:
        """Append detokenized text; True when it completed a stop string (the text is cut)."""
        if not piece:
            return False
        searched = self.tail + piece
        if can_stop and self.params.stop:
            hit = _first_stop(searched, self.params.stop)
            if hit is not None:
                pos, stop = hit
                end = pos + len(stop) if self.params.include_stop_str_in_output else pos
                self._release(searched[:end])
                self.finish_reason, self.stop_reason = "stop", stop
                return True
        keep = min(self._num_held_chars, len(searched))
        self._release(searched[: len(searched) - keep])
        self.tail = searched[len(searched) - keep :]
        return False

    def finish(self, finish_reason: str, stop_reason: int | str | None, flush: bool) -> None:
        """End the sample: its held-back text becomes final, and with `flush` so do the bytes of
        an unfinished character the detokenizer still holds (the reply was cut inside it)."""
        if flush and self.detokenizer is not None:
            self.tail += self.detokenizer.flush()
        self._release(self.tail)
        self.finish_reason, self.stop_reason = finish_reason, stop_reason

    def take_output(self) -> CompletionOutput:
        """This sample's part of the next RequestOutput. DELTA and FINAL_ONLY hand their lists
        over (the receiver owns them); CUMULATIVE copies, as it reports them again."""
        if len(self.chunks) > 1:
            self.chunks[:] = ["".join(self.chunks)]
        text = self.chunks[0] if self.chunks else ""
        token_ids, logprobs = self.token_ids, self.logprobs
        if self.kind == OutputKind.DELTA:
            self.chunks = []
            self.token_ids = []
            self.logprobs = [] if logprobs is not None else None
        elif self.kind == OutputKind.CUMULATIVE:
            token_ids = list(token_ids)
            logprobs = list(logprobs) if logprobs is not None else None
        self.is_finish_reported = self.is_finished
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=token_ids,
            logprobs=logprobs,
            cumulative_logprob=self.cumulative_logprob,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )

    def _release(self, text: str) -> None:
        if text:
            self.chunks.append(text)
        self.tail = ""


def _first_stop(text: str, stops: tuple[str, ...] | list[str]) -> tuple[int, str] | None:
    hits = [(pos, s) for s in stops if (pos := text.find(s)) >= 0]
    return min(hits) if hits else None
