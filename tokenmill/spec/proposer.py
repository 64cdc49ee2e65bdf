"""What every draft proposer offers the engine (spec/ngram.py, spec/draft_model.py)."""

from __future__ import annotations

from typing import Protocol

from tokenmill.engine.request import Request


class Proposer(Protocol):
    def propose(self, requests: list[Request], num_drafts: list[int]) -> list[list[int]]:
        """Up to `num_drafts[i]` draft tokens to follow `requests[i].all_token_ids` (fewer, or
        none, where the proposer has nothing it believes in). Called on the engine thread."""
        ...

    def draft_seconds(self, num_drafts: list[int]) -> float:
        """Predicted time of proposing `num_drafts` (one entry per request) this step."""
        ...

    def release(self, request_ids: list[str]) -> None:
        """Forget state kept for requests that ended or were preempted."""
        ...
