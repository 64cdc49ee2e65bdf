"""Prompt lookup: draft the tokens that followed the last occurrence of the current suffix.

For n from `max_n` down to `min_n`, find the most recent earlier place where the sequence's last
n tokens occur (in the prompt or the output so far) and propose the k tokens that came after it
(a match close to the end continues periodically: `periodic_copy`). Editing, annotating or
quoting a given text repeats long stretches of it, and there this costs nothing and is often
right.

Each request keeps an index of where every n-gram last ended (`SuffixIndex`), extended by the
tokens a step appended, so a lookup is a few dictionary reads however long the context (~8 us):
a scan of a 600-token context without a match takes ~0.1 ms, and proposing took a median
0.8-1.9 ms a step at 32 requests in run 20's trace (BENCHMARKS 9), a few percent of the step.
"""

from __future__ import annotations

from tokenmill.engine.request import Request


class SuffixIndex:
    """The latest end of every n-gram (min_n <= n <= max_n) of a growing token sequence, the
    ones ending at its last token excepted (the current suffix must match an earlier place).
    Memory: max_n - min_n + 1 entries a token (0.5 MB for a 1,000-token context at n = 2-5)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self._ends: dict[tuple[int, ...], int] = {}  # n-gram -> its latest end (exclusive)
        self._num_indexed = 0  # n-grams ending at positions 1 .. this are in `_ends`
        self.match_length = 0  # of the last lookup's suffix (0: none matched)

    def continuation(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens following the latest earlier match of the longest matching suffix
        (max_n down to min_n tokens), for a sequence that only grows between calls."""
        size = len(tokens)
        if size <= self._num_indexed:  # not the sequence indexed so far: start again
            self._ends.clear()
            self._num_indexed = 0
        self._extend(tokens, size - 1)
        self.match_length = 0
        if k <= 0:
            return []
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            end = self._ends.get(tuple(tokens[size - n :]))
            if end is not None:
                self.match_length = n
                return periodic_copy(tokens, end, k)
        return []

    def _extend(self, tokens: list[int], last_end: int) -> None:
        """Index the n-grams ending at positions _num_indexed + 1 .. last_end, in order (a
        later end replaces an earlier one), n columns zipped per n: no Python loop a token."""
        for n in range(self.min_n, self.max_n + 1):
            first_end = max(self._num_indexed + 1, n)
            if first_end > last_end:
                continue
            columns = [tokens[first_end - n + i : last_end - n + i + 1] for i in range(n)]
            grams = zip(*columns, strict=True)  # every column holds last_end - first_end + 1
            self._ends.update(zip(grams, range(first_end, last_end + 1), strict=True))
        self._num_indexed = max(self._num_indexed, last_end)


def periodic_copy(tokens: list[int], start: int, k: int) -> list[int]:
    """k tokens copied from `start` on, the copy continuing into itself past the end (as an
    overlapping LZ77 copy): a match p tokens back says the text repeats with period p, so a
    line repeated over and over drafts k tokens, not just the p that follow the match."""
    period = len(tokens) - start
    if k <= period:
        return tokens[start : start + k]
    return [tokens[start + i % period] for i in range(k)]


class NgramProposer:
    is_lookup = True  # proposing is cheap enough to do before the draft counts are chosen

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self._indexes: dict[str, SuffixIndex] = {}

    def propose(self, requests: list[Request], num_drafts: list[int]) -> list[list[int]]:
        out = []
        for request, k in zip(requests, num_drafts, strict=True):
            index = self._indexes.get(request.request_id)
            if index is None:
                index = self._indexes[request.request_id] = SuffixIndex(self.min_n, self.max_n)
            out.append(index.continuation(request.all_token_ids, k))
        return out

    def state(self, request_id: str) -> int:
        """What the acceptance of the request's last proposal is learned under: the length of
        the suffix it matched (a longer match is more often right)."""
        index = self._indexes.get(request_id)
        return index.match_length if index is not None else 0

    def draft_seconds(self, num_drafts: list[int]) -> float:
        return 0.0  # a few dictionary reads a request

    def release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._indexes.pop(request_id, None)
