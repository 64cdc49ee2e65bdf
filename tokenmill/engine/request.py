"""A request's scheduling state: the tokens it knows and how many of them are in the KV cache.

    all_token_ids:  [ prompt ........................ | output ...... ]
                    |<----- num_computed_tokens ----->|
                    |<------------------ num_tokens ----------------->|

Each step the scheduler grants `num_scheduled` tokens so that computed catches up with known.
When, after a step, computed == known, the last token's logits were computed and a new token is
sampled. A prefill chunk, a decode step, a prefix-cache hit (computed jumps forward for free),
resuming after preemption (computed drops to 0) and speculative verification (k draft tokens
appended past num_tokens) are all this one rule.
"""

from __future__ import annotations

import enum
import itertools
import math
import time

from tokenmill.sampling_params import SamplingParams
from tokenmill.workload.slo import SLO

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
        priority: int = 0,
        slo: SLO | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = frozenset(() if sampling_params.ignore_eos else eos_token_ids)
        self.stop_token_ids = frozenset(sampling_params.stop_token_ids)
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        # Breaks ties between equal arrival times so ordering is total and deterministic.
        self.arrival_seq = next(_arrival_counter)
        self.priority = priority  # lower value = more important (vLLM's convention)

        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first scheduling; -1 before
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # Draft tokens proposed for this step; scheduled after the known tokens.
        self.spec_token_ids: list[int] = []
        # Leading entries of the block table the runner already has (0 after preemption).
        self.num_block_ids_sent = 0
        # Hashes of this request's full blocks, filled lazily by the KV cache manager.
        self.block_hashes: list[bytes] = []
        # Latency promise (engine/slo_admission.py): the targets asked for (None or no targets:
        # best effort), whether they are promised, and when tokens came (the scheduler's clock).
        self.slo = slo
        self.is_best_effort = slo is None or (slo.ttft_s is None and slo.tpot_s is None)
        self.is_promised = False
        self.predicted_first_token_time: float | None = None  # by its admission (promised)
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return len(self.all_token_ids) + len(self.spec_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def is_prompt_position(self, position: int) -> bool:
        """A step starting at `position` is a prompt step: it computes prompt tokens (after
        preemption, a recompute of the prompt counts as one too)."""
        return position < self.num_prompt_tokens

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Smaller = served first, preempted last."""
        return (self.priority, self.arrival_time, self.arrival_seq)

    @property
    def deadline(self) -> float:
        """When its next token is due: the first by arrival + TTFT, each later one by the last
        token + TPOT (inf for best effort, or a target it does not set)."""
        if self.is_best_effort:
            return math.inf
        if self.first_token_time is None:
            ttft = self.slo.ttft_s
            return math.inf if ttft is None else self.arrival_time + ttft
        tpot = self.slo.tpot_s
        return math.inf if tpot is None else self.last_token_time + tpot

    def deadline_key(self, by_priority: bool) -> tuple:
        """Earliest deadline first (within a priority class when `by_priority`); best effort
        after every promise of its class."""
        prio = self.priority if by_priority else 0
        return (prio, self.is_best_effort, self.deadline, self.arrival_time, self.arrival_seq)

    @property
    def slo_class(self) -> str:
        """The class its latency is counted under: its priority, or best_effort."""
        return "best_effort" if self.is_best_effort else str(self.priority)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens})"
        )
