"""Prompt lookup: draft the tokens that followed the last occurrence of the current suffix.

For n from `max_n` down to `min_n`, find the most recent earlier place where the sequence's last
n tokens occur (in the prompt or the output so far) and propose the (up to k) tokens that came
after it. Editing, annotating or quoting a given text repeats long stretches of it, and there
this costs nothing and is often right.
"""

from __future__ import annotations

import numpy as np

from tokenmill.engine.request import Request


def find_continuation(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens following the latest earlier match of the longest matching suffix."""
    size = len(tokens)
    if k <= 0 or size < min_n + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = arr[size - n :]
        # Windows starting at 0 .. size-n-1 (the suffix itself excluded).
        windows = np.lib.stride_tricks.sliding_window_view(arr[: size - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + k]
    return []


class NgramProposer:
    is_lookup = True  # proposing is cheap enough to do before the draft counts are chosen

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: list[Request], num_drafts: list[int]) -> list[list[int]]:
        return [
            find_continuation(r.all_token_ids, self.min_n, self.max_n, k)
            for r, k in zip(requests, num_drafts, strict=True)
        ]

    def draft_seconds(self, num_drafts: list[int]) -> float:
        return 0.0  # a lookup, microseconds

    def release(self, request_ids: list[str]) -> None:
        pass
