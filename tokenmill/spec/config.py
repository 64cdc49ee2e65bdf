"""`--speculative-config`: which proposer drafts tokens and how many, spelled as vLLM spells it.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    {"method": "draft", "model": "path/to/small.gguf", "num_speculative_tokens": "auto"}
    {"method": "self", "quantization": "int4-g32"}

`num_speculative_tokens` is the most drafts per request per step, or "auto": up to
`max_speculative_tokens`, each step choosing how many (0 included) from the step-cost model and
the measured acceptance (spec/controller.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from tokenmill.errors import ConfigError

METHODS = ("ngram", "draft", "self")
DEFAULT_MAX_AUTO = 8


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int | str = "auto"
    max_speculative_tokens: int = DEFAULT_MAX_AUTO  # the ceiling of "auto"
    prompt_lookup_min: int = 2  # ngram: the shortest suffix that may match
    prompt_lookup_max: int = 5  # ngram: the longest suffix tried first
    model: str | None = None  # draft: the draft model (a GGUF file or HF folder)
    # self: the target's own weights quantized ("auto": gguf blocks for a quantized GGUF,
    # else int4-g32); draft: how the draft model computes ("none" = as shipped).
    quantization: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"speculative method must be one of {METHODS}, got {self.method!r}")
        k = self.num_speculative_tokens
        if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(
                f"num_speculative_tokens must be a positive integer or 'auto', got {k!r}"
            )
        if not 1 <= self.max_speculative_tokens <= 32:
            raise ConfigError("max_speculative_tokens must be in [1, 32]")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ConfigError(
                "prompt_lookup_min and prompt_lookup_max must satisfy 1 <= min <= max, got "
                f"{self.prompt_lookup_min} and {self.prompt_lookup_max}"
            )
        if self.method == "draft" and not self.model:
            raise ConfigError('speculative method "draft" needs "model": the draft model path')
        from tokenmill.quant.schemes import parse_quantization

        if self.quantization != "auto":
            parse_quantization(self.quantization)

    @property
    def is_auto(self) -> bool:
        return self.num_speculative_tokens == "auto"

    @property
    def max_drafts(self) -> int:
        """The most drafts one request gets in one step."""
        return self.max_speculative_tokens if self.is_auto else int(self.num_speculative_tokens)


def parse_speculative_config(value: str | dict | SpeculativeConfig | None):
    """A SpeculativeConfig from JSON text, a dict, or one already built; None stays None."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--speculative-config is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError("the speculative config must be a JSON object")
    value = dict(value)
    if "method" not in value and "model" in value:
        value["method"] = "draft"  # vLLM: a draft model named without a method
    known = {f.name for f in fields(SpeculativeConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"unknown speculative config field(s) {unknown}; known: {sorted(known)}")
    return SpeculativeConfig(**value)
