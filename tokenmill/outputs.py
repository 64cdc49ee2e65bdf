"""What generation returns to users, in the shape vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class OutputKind(Enum):
    """What each RequestOutput of a request carries (vLLM's RequestOutputKind).

    CUMULATIVE: everything generated so far, every step (O(n) per step: for callers that
        want snapshots). DELTA: only what is new since the request's previous output; a stream
        of n tokens costs O(n) in all. FINAL_ONLY: one cumulative output, when it finishes.
    """

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob, holding the sampled token and the top-n.
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    """One sample's text, token ids and logprobs: all of them so far (CUMULATIVE, FINAL_ONLY)
    or only what is new since the previous output of the request (DELTA)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None  # of all tokens so far, in every output kind
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    """A request's progress. In DELTA mode `outputs` holds only the samples with news, and
    `prompt_logprobs` comes with the first output alone."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
