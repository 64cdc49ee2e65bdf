"""Speed of a built engine, read from its own step trace (EngineConfig.record_step_trace).

    prefill tok/s      prompt tokens / wall time of the steps that computed them
                       (`num_prefill_prompts` prompts of `prefill_len` tokens, one output token)
    decode tok/s @ b   b / median wall time of the pure-decode steps that ran all b requests
                       (b prompts of `prompt_len` tokens, `output_len` tokens each, EOS ignored)

Prompts are distinct token ids and the prefix cache is reset first, so nothing is skipped.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass

from tokenmill.config import EngineConfig
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams


@dataclass(frozen=True)
class SpeedSettings:
    batch_sizes: tuple[int, ...] = (1, 64)
    prompt_len: int = 128
    output_len: int = 64
    prefill_len: int = 512
    num_prefill_prompts: int = 4


@dataclass(frozen=True)
class SpeedResult:
    prefill_tok_s: float
    decode_tok_s: dict[str, float]  # batch size -> output tokens/s


def serving_config(base: EngineConfig, speed: SpeedSettings, max_context: int) -> EngineConfig:
    """The engine that answers questions and is timed: the largest decode batch running at once,
    with KV blocks for that batch and for a few of the longest answers."""
    block = base.cache.block_size
    batch = max(speed.batch_sizes)
    per_request = -(-(speed.prompt_len + speed.output_len + 1) // block) + 1
    longest = -(-(max(max_context, speed.prefill_len) + 1) // block) + 1
    num_blocks = max(batch * per_request, speed.num_prefill_prompts * longest, 8 * longest)
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, max_model_len=num_blocks * block),
        cache=dataclasses.replace(base.cache, num_blocks=num_blocks),
        scheduler=dataclasses.replace(
            base.scheduler, max_num_seqs=max(batch, 64), max_num_batched_tokens=2048
        ),
        record_step_trace=True,
    )


def distinct_prompts(num: int, length: int, vocab_size: int, salt: int = 0) -> list[list[int]]:
    base = min(1000, vocab_size // 2)
    span = vocab_size - base
    return [
        [base + ((i + salt * 131) * 7919 + j * 104729) % span for j in range(length)]
        for i in range(num)
    ]


def measure_speed(engine, speed: SpeedSettings) -> SpeedResult:
    if not engine.config.record_step_trace:
        raise ValueError("speed is read from the step trace: build with record_step_trace=True")
    llm = LLM.from_engine(engine)
    vocab = engine.arch.vocab_size
    _generate(llm, distinct_prompts(1, 16, vocab, salt=7), 4)  # warm-up
    prefill_len = min(speed.prefill_len, engine.max_model_len - 2)
    _generate(llm, distinct_prompts(speed.num_prefill_prompts, prefill_len, vocab, salt=1), 1)
    steps = [s for s in engine.step_trace if s.has_prompt_tokens]
    prefill = sum(s.num_prefill_tokens for s in steps) / sum(s.wall_time_s for s in steps)
    decode = {}
    for batch in speed.batch_sizes:
        prompts = distinct_prompts(batch, speed.prompt_len, vocab, salt=2 + batch)
        _generate(llm, prompts, speed.output_len)
        steps = [s.wall_time_s for s in engine.step_trace
                 if not s.has_prompt_tokens and s.num_reqs == batch]  # fmt: skip
        if not steps:
            raise RuntimeError(f"no decode step ran all {batch} requests at once")
        decode[str(batch)] = batch / statistics.median(steps)
    return SpeedResult(prefill, decode)


def _generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> None:
    llm.engine.reset_prefix_cache()
    llm.engine.step_trace.clear()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
