"""Model-based drafts ("self": the target's own weights quantized; "draft": another model with
the same tokenizer): greedy output with them equals greedy output without, the self-draft's
drafts are mostly accepted, a draft model with other tokens is refused, and the draft's KV
blocks all come back when requests finish or are aborted."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from tokenmill import LLM
from tokenmill.engine.build import engine_sharing_weights
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.errors import ConfigError
from tokenmill.outputs import OutputKind
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec.target_kv import COPY_MIN_TOKENS

GREEDY = SamplingParams(max_tokens=32, temperature=0)


def _with_spec(base: LLM, spec: dict) -> LLM:
    cfg = dataclasses.replace(base.engine.config, speculative_config=spec)
    return LLM.from_engine(engine_sharing_weights(base.engine, cfg))


@pytest.fixture(scope="module")
def base() -> LLM:
    """The bundled SmolLM2 (Q4_1 GGUF) computing in bfloat16, without speculation."""
    return LLM(kv_cache_memory_gib=0.25)


@pytest.fixture(scope="module")
def prompts(base) -> list[list[int]]:
    tok = base.get_tokenizer()
    code = "def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n"
    chats = [
        "What is the capital of France? Answer in one sentence.",
        "Add type hints to this function and explain them briefly:\n\n" + code,  # > 1 block
        "Write a haiku about the sea.",
    ]
    return [
        tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
        for c in chats
    ]


@pytest.fixture(scope="module")
def reference(base, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in base.generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def self_llm(base) -> LLM:
    return _with_spec(base, {"method": "self", "num_speculative_tokens": 4})


def _token_ids(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def _assert_no_draft_fault(caplog) -> None:
    """A draft fault only costs drafts (the target goes on): the tests must see it."""
    faults = [r for r in caplog.records if r.name == "tokenmill.spec.draft_proposer"]
    assert not faults, faults[0].getMessage()


def _assert_draft_kv_free(llm: LLM) -> None:
    proposer = llm.engine.spec.proposer
    assert proposer.kv.pool.num_used_blocks == 0
    assert proposer.num_shadows == 0
    proposer.kv.check_invariants()


def test_self_draft_output_equals_no_speculation(self_llm, prompts, reference, caplog):
    assert prompts[1].__len__() > self_llm.engine.config.cache.block_size
    assert _token_ids(self_llm, prompts) == reference  # batch 3
    assert _token_ids(self_llm, prompts[1:2]) == reference[1:2]  # batch 1
    _assert_draft_kv_free(self_llm)
    _assert_no_draft_fault(caplog)
    stats = self_llm.engine.stats().spec
    print(
        f"self-draft: {stats.num_accepted_tokens}/{stats.num_draft_tokens} drafts accepted "
        f"({stats.acceptance_rate:.2f}), per position {stats.acceptance_per_position()}"
    )
    assert stats.num_draft_tokens > 0
    assert stats.acceptance_rate > 0.5  # Q4_1 blocks drafting for their own bf16 dequant


def test_the_self_draft_takes_the_prompt_from_the_target_cache(self_llm, prompts, reference):
    """No draft step computes a prompt: the self-draft copies the K/V the target computed and
    computes only the last token or two, and its drafts still mostly stand."""
    proposer = self_llm.engine.spec.proposer
    assert proposer.target_kv is not None
    real, longest = proposer.runner.execute, []

    def spy(step):
        longest.extend(len(s.token_ids) for s in step.scheduled)
        return real(step)

    proposer.runner.execute = spy
    before = self_llm.engine.stats().spec
    try:
        assert _token_ids(self_llm, prompts[1:2]) == reference[1:2]
    finally:
        del proposer.runner.execute
    assert len(prompts[1]) > 2 * COPY_MIN_TOKENS and longest
    assert max(longest) < COPY_MIN_TOKENS  # the prompt itself was never computed
    after = self_llm.engine.stats().spec
    drafted = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    assert drafted > 0 and accepted / drafted > 0.5
    _assert_draft_kv_free(self_llm)


def test_the_self_draft_copies_an_int8_cache_with_its_scales(prompts):
    """Over an int8 KV cache the copy takes the per-slot scales too: output stays exact and
    the drafts still mostly stand (wrong scales would wreck them)."""
    plain = LLM(kv_cache_memory_gib=0.25, kv_cache_dtype="int8")
    spec = {"method": "self", "num_speculative_tokens": 4}
    llm = _with_spec(plain, spec)
    assert llm.engine.spec.proposer.target_kv is not None
    assert llm.engine.spec.proposer.runner.kv_scales is not None
    assert _token_ids(llm, prompts[1:2]) == _token_ids(plain, prompts[1:2])
    stats = llm.engine.stats().spec
    assert stats.num_draft_tokens > 0 and stats.acceptance_rate > 0.5


def test_draft_model_output_equals_no_speculation(base, smollm_path, prompts, reference, caplog):
    llm = _with_spec(base, {"method": "draft", "model": smollm_path, "num_speculative_tokens": 3})
    assert _token_ids(llm, prompts) == reference
    assert llm.engine.spec.proposer.target_kv is None  # another model computes its own K/V
    stats = llm.engine.stats().spec
    assert stats.acceptance_rate > 0.8  # the target's own weights: nearly every draft stands
    _assert_draft_kv_free(llm)
    _assert_no_draft_fault(caplog)


def test_draft_with_another_tokenizer_is_refused(base, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    LlamaForCausalLM(tiny).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(
        ConfigError, match="vocabulary of 1000 tokens.*share the target's tokenizer"
    ):
        _with_spec(base, {"method": "draft", "model": str(tmp_path)})


def test_draft_kv_freed_after_aborts(self_llm, prompts, caplog):
    engine = self_llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"abort-{i}", prompt, GREEDY, output_kind=OutputKind.FINAL_ONLY)
    for _ in range(4):
        engine.step()
    assert engine.spec.proposer.num_shadows > 0
    engine.abort_request(["abort-0", "abort-2"])
    while engine.has_unfinished_requests():
        engine.step()
    _assert_draft_kv_free(self_llm)
    _assert_no_draft_fault(caplog)


def test_draft_cache_out_of_blocks_drafts_nothing_and_stays_exact(
    self_llm, prompts, reference, caplog
):
    proposer = self_llm.engine.spec.proposer
    roomy = proposer.kv
    # 4 blocks: the short prompts draft, the long one and a third request find no room.
    proposer.kv = KVCacheManager(4, roomy.block_size, enable_prefix_caching=False)
    try:
        assert _token_ids(self_llm, prompts) == reference
        _assert_draft_kv_free(self_llm)
        _assert_no_draft_fault(caplog)
    finally:
        proposer.kv = roomy


def test_draft_seconds_from_measured_steps(self_llm):
    proposer = self_llm.engine.spec.proposer
    assert proposer.draft_seconds([0, 0]) == 0.0
    one = proposer.draft_seconds([1])
    assert one > 0 and proposer.draft_seconds([4, 0]) == pytest.approx(4 * one)
    assert proposer.draft_seconds([4, 2]) > 0


def test_a_draft_fault_drafts_nothing_and_fails_no_request(self_llm, prompts, reference):
    proposer = self_llm.engine.spec.proposer
    real, calls = proposer.runner.execute, itertools.count()

    def flaky(step):  # the fourth draft step fails
        if step.scheduled and next(calls) == 3:
            raise RuntimeError("injected draft fault")
        return real(step)

    proposer.runner.execute = flaky
    try:
        assert _token_ids(self_llm, prompts[:1]) == reference[:1]
        assert next(calls) > 4  # the fault happened, and drafting went on after it
        _assert_draft_kv_free(self_llm)
    finally:
        del proposer.runner.execute


def test_a_draft_equal_to_the_target_accepts_every_draft(smollm_path, prompts):
    """float32 target and draft of the same file: every draft stands, counted so even where an
    accepted EOS ends the reply (the run is cut after it and no bonus token follows)."""
    target = LLM(dtype="float32", kv_cache_memory_gib=0.25)
    spec = {"method": "draft", "model": smollm_path, "num_speculative_tokens": 2}
    llm = _with_spec(target, spec | {"quantization": "none"})
    outs = llm.generate([prompts[0], prompts[2]], SamplingParams(max_tokens=64, temperature=0))
    assert [o.outputs[0].finish_reason for o in outs] == ["stop", "stop"]  # both end at EOS
    stats = llm.engine.stats().spec
    assert stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens == stats.num_draft_tokens, stats.acceptance_per_position()
