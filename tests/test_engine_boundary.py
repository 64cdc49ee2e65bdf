"""The scheduler -> runner -> scheduler boundary carries the receiver's own data: a runner that
scribbles over every list it was given or returned, once the engine is done with a step, changes
nothing the engine does. One runner serves one engine."""

from __future__ import annotations

import dataclasses

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.config import SchedulerConfig
from tokenmill.engine.build import engine_sharing_weights
from tokenmill.engine.interfaces import BaseRunner, RunnerOutput, SchedulerOutput
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land"]


class ScribblingRunner(BaseRunner):
    """A real runner whose step inputs and outputs are overwritten after the engine used them."""

    def __init__(self, inner: BaseRunner) -> None:
        self.inner = inner
        self.num_blocks = inner.num_blocks
        self._last: tuple[SchedulerOutput, RunnerOutput] | None = None

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self._scribble()
        out = self.inner.execute(scheduler_output)
        self._last = (scheduler_output, out)
        return out

    def _scribble(self) -> None:
        if self._last is None:
            return
        sched_out, out = self._last
        for sched in sched_out.scheduled:
            sched.token_ids[:] = [0] * len(sched.token_ids)
            sched.new_block_ids[:] = [0] * len(sched.new_block_ids)
        for new in sched_out.new_requests:
            new.prompt_token_ids[:] = [0] * len(new.prompt_token_ids)
        for tokens in out.sampled.values():
            tokens[:] = [0] * len(tokens)
            tokens.append(0)


def _engine_like(llm: LLM, wrap=None, **scheduler) -> LLMEngine:
    base = llm.engine
    cfg = dataclasses.replace(
        base.config, scheduler=dataclasses.replace(base.config.scheduler, **scheduler)
    )
    if wrap is None:
        return engine_sharing_weights(base, cfg)
    runner = wrap(base.runner.sharing_weights(cfg))
    return LLMEngine(cfg, runner, base.loaded)


def test_mutating_step_data_after_the_step_changes_nothing(llm_fp32):
    # Small chunks: every prompt takes several steps, so each step's data is reused by none.
    clean = LLM.from_engine(_engine_like(llm_fp32, max_num_batched_tokens=8))
    expected = [o.outputs[0].token_ids for o in clean.generate(PROMPTS, GREEDY, use_tqdm=False)]
    engine = _engine_like(llm_fp32, ScribblingRunner, max_num_batched_tokens=8)
    outs = LLM.from_engine(engine).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    engine.kv_manager.check_invariants()
    assert engine.stats().kv_cache_usage == 0


def test_scheduler_output_is_a_copy_of_the_scheduler_state():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=6), kv, max_model_len=64)
    request = Request("a", list(range(10)), SamplingParams(max_tokens=4, ignore_eos=True))
    sched.add_request(request)
    first = sched.schedule()
    assert first.scheduled[0].new_block_ids == [0, 1] and first.new_requests[0].req_id == "a"
    first.scheduled[0].token_ids.append(99)
    first.scheduled[0].new_block_ids.append(99)
    first.new_requests[0].prompt_token_ids.append(99)
    assert request.prompt_token_ids == list(range(10)) and request.all_token_ids == list(range(10))
    assert kv.block_ids("a") == [0, 1]
    out = RunnerOutput(sampled={})
    sched.update_from_output(first, out)
    second = sched.schedule()
    # Only the block the runner has not seen travels, placed after the two it has.
    assert second.scheduled[0].block_table_start == 2
    assert second.scheduled[0].new_block_ids == [2]
    kv.check_invariants()


def test_preempted_request_resends_its_whole_block_table():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv, max_model_len=64)
    for i, name in enumerate("ab"):
        sched.add_request(
            Request(name, [i] * 8, SamplingParams(max_tokens=8, ignore_eos=True), arrival_time=i)
        )
    first = sched.schedule()
    sched.update_from_output(first, RunnerOutput(sampled={"a": [1], "b": [1]}))
    second = sched.schedule()  # both need a third block; b is preempted
    assert [s.req_id for s in second.scheduled] == ["a"]
    sched.update_from_output(second, RunnerOutput(sampled={"a": [1]}))
    sched.finish_requests(["a"], sched.requests["a"].status.FINISHED_ABORTED)
    third = sched.schedule()
    resumed = next(s for s in third.scheduled if s.req_id == "b")
    assert resumed.block_table_start == 0 and resumed.new_block_ids == kv.block_ids("b")


def test_a_runner_serves_one_engine(llm_fp32):
    with pytest.raises(RuntimeError, match="already serves another engine"):
        LLMEngine(llm_fp32.engine.config, llm_fp32.engine.runner, llm_fp32.engine.loaded)


def test_reset_prefix_cache_forgets_prefixes_and_is_refused_while_blocks_are_held(llm_fp32):
    llm = LLM.from_engine(_engine_like(llm_fp32))
    prompt = list(range(100, 140))  # two full blocks and a partial one
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)
    assert llm.generate([prompt], params, use_tqdm=False)[0].num_cached_tokens == 32
    assert llm.engine.reset_prefix_cache() > 0
    assert llm.generate([prompt], params, use_tqdm=False)[0].num_cached_tokens == 0
    llm.engine.add_request("held", prompt, params)
    llm.engine.step()  # the request now holds blocks
    with pytest.raises(RuntimeError, match="while requests hold KV blocks"):
        llm.engine.reset_prefix_cache()
    llm.engine.abort_request("held")
