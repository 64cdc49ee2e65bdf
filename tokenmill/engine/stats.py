"""What the engine reports about itself: one snapshot type that the server's metrics, the async
engine and the planner read, so that nobody reaches into the scheduler or the KV manager."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.slo_stats import SloSnapshot
from tokenmill.spec.acceptance import SpecCounters


@dataclass(frozen=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks referenced by requests
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # tokens found there
    # Prompt tokens of requests that got their first token, prefix-cache hits included (vLLM's
    # meaning of the prompt-token counter).
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0  # tokens sampled
    num_preemptions: int = 0
    num_model_steps: int = 0  # steps that ran the model (one per step-trace record)
    prompt_step_time_s: float = 0.0  # wall time of the steps that computed prompt tokens
    # Latency promises: attained / missed targets, goodput, refusals, predicted step times.
    slo: SloSnapshot = field(default_factory=SloSnapshot)
    # Speculative decoding: drafts proposed and accepted, per position; None when it is off.
    spec: SpecCounters | None = None


@dataclass(frozen=True)
class ServingStats:
    """A consistent snapshot, taken by the loop thread after each iteration: the engine's own
    stats and the loop's."""

    engine: EngineStats = EngineStats()
    num_streams: int = 0  # requests with a consumer attached (running, waiting or being added)
    step_time_total_s: float = 0.0  # wall time spent in LLMEngine.step(), summed
    # Wall time of the loop's iterations that ran the model: taking in new requests, the step,
    # handing out its outputs; what a request waits per step (step_time_total_s and the rest).
    loop_time_total_s: float = 0.0
    is_running: bool = False  # the loop thread is alive and serving
