"""The plain data a workload is made of: what each request asks for and when it is sent."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkloadRequest:
    prompt: str | None  # the text when it comes from a dataset; None for synthetic lengths
    prompt_len: int  # tokens
    output_len: int  # tokens to generate (sent as max_tokens with ignore_eos)
    arrival_s: float = 0.0  # offset from the start of the run


@dataclass(frozen=True)
class Workload:
    """Requests in arrival order. With max_concurrency, at most that many are in flight: a
    request waits for a free slot after its arrival time (vLLM bench's --max-concurrency)."""

    requests: tuple[WorkloadRequest, ...]
    max_concurrency: int | None = None
    description: str = ""

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    @property
    def num_input_tokens(self) -> int:
        return sum(r.prompt_len for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    @property
    def max_seq_len(self) -> int:
        return max((r.prompt_len + r.output_len for r in self.requests), default=0)

    @property
    def mean_seq_len(self) -> float:
        if not self.requests:
            return 0.0
        return sum(r.prompt_len + r.output_len for r in self.requests) / len(self.requests)
