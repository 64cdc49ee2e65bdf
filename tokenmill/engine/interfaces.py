"""The plain-data boundary between the scheduler and a runner: Python ints and lists, no tensors.

This boundary lets the planner's SimRunner stand in for the ModelRunner, and lets the scheduler
and KV cache manager be tested exhaustively without a model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from tokenmill.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """Sent once, the first time a request is scheduled: what the runner keeps per request.

    The runner owns its copies from then on: its block table (extended by each step's
    `ScheduledRequest.new_block_ids`) and its output tokens (extended by what it samples)."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams


@dataclass
class ScheduledRequest:
    """One request's share of a step. Every list is the runner's own (a copy or a diff).

    token_ids   = all_token_ids[num_computed_tokens : num_computed_tokens + len]
                  (+ spec_token_ids at the end when verifying drafts)
    positions   = num_computed_tokens ... num_computed_tokens + len - 1
    block table = runner's table[:block_table_start] + new_block_ids
                  (start 0 when the request is new or resumes after preemption)
    """

    req_id: str
    token_ids: list[int]
    num_computed_tokens: int  # tokens already in the cache before this step
    new_block_ids: list[int]  # blocks appended to the request's table since the last step
    # True when this step computes the last known token, so a new token is sampled.
    do_sample: bool
    block_table_start: int = 0  # where new_block_ids go in the runner's table
    spec_token_ids: list[int] = field(default_factory=list)
    # This step computes prompt tokens (a prompt chunk, or a whole prompt).
    is_prompt_step: bool = False

    @property
    def num_scheduled_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    new_requests: list[NewRequestData]
    # The runner drops its per-request state (sampling generators, etc.) for these.
    finished_req_ids: list[str]
    num_prefill_tokens: int = 0  # tokens of requests still in their prompt
    num_decode_tokens: int = 0

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class TokenLogprobs:
    """Logprobs of one sampled token: its own, its rank, and the top-n alternatives."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class RunnerOutput:
    """Per scheduled request that sampled: the accepted tokens (1, or up to k+1 when verifying
    k drafts) and, if asked for, their logprobs. Requests in the middle of a prefill chunk are
    absent."""

    sampled: dict[str, list[int]]
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # req_id -> logprobs of each prompt position computed this step (position 0 has none).
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)
    # Requests whose computation failed; the engine fails them alone.
    failed: dict[str, str] = field(default_factory=dict)


class BaseRunner(ABC):
    """Executes one scheduled step.

    Implementations: the ModelRunner (a real model on a device) and the planner's SimRunner (a
    cost model advancing a virtual clock). Both see the same SchedulerOutput stream.

    A runner serves one engine: its KV memory and per-request state mirror that engine's
    scheduler, so a second engine on the same runner would read blocks it never wrote.
    """

    num_blocks: int  # KV blocks the runner allocated
    _engine: object | None = None

    def bind(self, engine: object) -> None:
        """Claim the runner for one engine; a second engine is refused."""
        if self._engine is not None and self._engine is not engine:
            raise RuntimeError(
                "this runner already serves another engine; build one runner per engine "
                "(ModelRunner.sharing_weights reuses loaded weights)"
            )
        self._engine = engine

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Compute every scheduled token, sample for requests with do_sample, return the tokens."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release device resources."""
