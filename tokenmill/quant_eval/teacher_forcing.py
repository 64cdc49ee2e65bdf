"""Full-vocabulary logits of a text's target tokens, computed by the engine itself.

Each text is one request (prompt = context + target, prompt logprobs asked, one token sampled)
stepped through LLMEngine: the real scheduler, model forward, attention backend and paged KV
cache. The engine this is built for schedules one request at a time in chunks of
`chunk_tokens` (its token budget), so every chunk after the first attends to K/V read back from
the cache, in the cache's own dtype. The runner's `prompt_logits_observer` hands over each
chunk's logits; rows that score target tokens are kept:

    positions  0 ........ c-1 | c ........... n-1       (c = context length, n = all tokens)
    tokens     context        | target
    rows kept            c-1 ... n-2                    (row p scores token p + 1)
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.quant_eval.tasks import TeacherItem
from tokenmill.sampling_params import SamplingParams

_PARAMS = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, ignore_eos=True)


def teacher_forcing_config(base: EngineConfig, chunk_tokens: int, max_len: int) -> EngineConfig:
    """One request at a time, `chunk_tokens` per step, no prefix cache (a repeated text must be
    computed again), and just enough KV blocks for the longest text."""
    block = base.cache.block_size
    num_blocks = -(-(max_len + 1) // block) + 1
    return dataclasses.replace(
        base,
        # The context limit is what the cache holds (said here, so the engine need not warn).
        model=dataclasses.replace(base.model, max_model_len=num_blocks * block),
        cache=dataclasses.replace(base.cache, num_blocks=num_blocks, enable_prefix_caching=False),
        scheduler=dataclasses.replace(
            base.scheduler,
            max_num_seqs=1,
            max_num_batched_tokens=chunk_tokens,
            enable_chunked_prefill=True,
        ),  # fmt: skip
        record_step_trace=False,
    )


class TeacherForcer:
    """`logits(item)` -> [len(item.target_ids), V] float32 scores of the target tokens."""

    def __init__(self, engine: LLMEngine) -> None:
        if not hasattr(engine.runner, "prompt_logits_observer"):
            raise TypeError("teacher forcing needs a ModelRunner (prompt_logits_observer)")
        self.engine = engine
        self._ids = itertools.count()

    def logits(self, item: TeacherItem) -> torch.Tensor:
        tokens = item.context_ids + item.target_ids
        first, end = len(item.context_ids) - 1, len(tokens) - 1  # rows [first, end)
        if first < 0 or end <= first:
            raise ValueError("a teacher-forced text needs a context and a target")
        req_id = f"tf-{next(self._ids)}"
        pieces: dict[int, torch.Tensor] = {}

        def observe(rid: str, position: int, logits: torch.Tensor) -> None:  # logits (Q, V)
            lo, hi = max(first, position), min(end, position + logits.shape[0])
            if rid == req_id and lo < hi:
                pieces[lo] = logits[lo - position : hi - position].float().clone()  # (hi-lo, V)

        runner = self.engine.runner
        runner.prompt_logits_observer = observe
        try:
            self.engine.add_request(req_id, tokens, _PARAMS)
            while self.engine.has_unfinished_requests():
                self.engine.step()
        except BaseException:
            self.engine.abort_request(req_id)  # leaves the engine ready for the next text
            raise
        finally:
            runner.prompt_logits_observer = None
        rows = torch.cat([pieces[p] for p in sorted(pieces)]) if pieces else None
        if rows is None or rows.shape[0] != end - first:
            got = 0 if rows is None else rows.shape[0]
            raise RuntimeError(f"teacher forcing saw {got} of {end - first} target rows")
        return rows  # (len(target), V)
