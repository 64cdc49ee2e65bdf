"""Prompt lookup: draft the tokens that followed the last occurrence of the current suffix.

For n from `max_n` down to `min_n`, find the most recent earlier place where the sequence's last
n tokens occur (in the prompt or the output so far) and propose the (up to k) tokens that came
after it. Editing, annotating or quoting a given text repeats long stretches of it, and there
this costs nothing and is often right.

Each request keeps an index per n: every n-gram that has a token after it, to its latest start.
A sequence only grows (drafts live apart from it until accepted), so each step indexes only the
tokens it gained and a lookup is max_n - min_n + 1 dictionary probes: at batch 1 a step is a
few milliseconds, and rescanning the whole sequence each step cost a few percent of it.
"""

from __future__ import annotations

from tokenmill.engine.request import Request


class SuffixIndex:
    """The n-grams of one growing sequence, n in [min_n, max_n], each to its latest start among
    those followed by at least one token."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.ns = range(min_n, max_n + 1)
        self.starts: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.ns}
        self.num_indexed = 0  # n-grams ending before this position are in `starts`

    def extend(self, tokens: list[int]) -> None:
        """Index the n-grams that end before the sequence's last token."""
        if len(tokens) < self.num_indexed:  # not the sequence indexed so far: start again
            self.__init__(self.ns.start, self.ns.stop - 1)
        for end in range(self.num_indexed, len(tokens) - 1):  # n-gram tokens[end-n+1 : end+1]
            for n in self.ns:
                if end + 1 >= n:
                    self.starts[n][tuple(tokens[end + 1 - n : end + 1])] = end + 1 - n
        self.num_indexed = max(self.num_indexed, len(tokens) - 1)

    def continuation(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens following the latest earlier match of the longest matching suffix."""
        if k <= 0:
            return []
        self.extend(tokens)
        for n in reversed(self.ns):
            if n >= len(tokens):
                continue
            start = self.starts[n].get(tuple(tokens[len(tokens) - n :]))
            if start is not None:
                return tokens[start + n : start + n + k]
        return []


class NgramProposer:
    is_lookup = True  # proposing is cheap enough to do before the draft counts are chosen

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.indexes: dict[str, SuffixIndex] = {}

    def propose(self, requests: list[Request], num_drafts: list[int]) -> list[list[int]]:
        drafts = []
        for request, k in zip(requests, num_drafts, strict=True):
            index = self.indexes.get(request.request_id)
            if index is None:
                index = self.indexes[request.request_id] = SuffixIndex(self.min_n, self.max_n)
            drafts.append(index.continuation(request.all_token_ids, k))
        return drafts

    def draft_seconds(self, num_drafts: list[int]) -> float:
        return 0.0  # a lookup, microseconds

    def release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.indexes.pop(request_id, None)
