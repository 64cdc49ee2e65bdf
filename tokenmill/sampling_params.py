"""Per-request sampling parameters, validated on construction (vLLM's names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from tokenmill.errors import InvalidRequestError

if TYPE_CHECKING:
    from tokenmill.structured.grammar import Grammar

MAX_LOGPROBS = 20
# Temperatures below this sample as greedy: dividing logits by them overflows float32.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: until the context window is full
    min_tokens: int = 0
    logprobs: int | None = None  # top-n logprobs per sampled token (0: the sampled token's only)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Structured outputs: the output must match this grammar (tokens it forbids are masked).
    grammar: Grammar | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # Accept lists and single strings from callers; store tuples so the object stays hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        self._validate()

    def _validate(self) -> None:
        _check(
            isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}"
        )
        _check(
            _is_number(self.temperature), f"temperature must be a number, got {self.temperature!r}"
        )
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(_is_number(self.top_p), f"top_p must be a number, got {self.top_p!r}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(
            isinstance(self.top_k, int) and (self.top_k >= 0 or self.top_k == -1),
            f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}",
        )
        _check(
            _is_number(self.min_p) and 0 <= self.min_p <= 1,
            f"min_p must be in [0, 1], got {self.min_p!r}",
        )
        _check(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(
                _is_number(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}"
            )
        _check(
            self.seed is None or isinstance(self.seed, int),
            f"seed must be an integer, got {self.seed!r}",
        )
        _check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            f"max_tokens must be an integer >= 1, got {self.max_tokens!r}",
        )
        _check(
            isinstance(self.min_tokens, int) and self.min_tokens >= 0,
            f"min_tokens must be an integer >= 0, got {self.min_tokens!r}",
        )
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(
                value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS),
                f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}",
            )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop must be a list of non-empty strings",
        )
        _check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids must be a list of non-negative integers",
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def effective_top_k(self) -> int:
        return 0 if self.top_k in (0, -1) else self.top_k

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with no penalties, logprobs or grammar: the argmax is the whole answer."""
        return (
            self.is_greedy
            and self.logprobs is None
            and not self.has_penalties
            and self.grammar is None
        )

    def can_stop(self, num_output_tokens: int) -> bool:
        """min_tokens: EOS, stop token ids and stop strings may end the output only once it has
        this many tokens (before that, EOS and stop ids are also masked in sampling)."""
        return num_output_tokens >= self.min_tokens

    def for_child(self, index: int) -> SamplingParams:
        """The parameters of the index-th of n parallel samples: n=1, and a distinct seed."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequestError(message)
