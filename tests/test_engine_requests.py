"""Request handling on the real model: stop rules, logprobs, bad input, and that one bad request
never disturbs the others."""

from __future__ import annotations

import math

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.errors import ContextLengthError, InvalidRequestError, ModelLoadError
from tokenmill.outputs import OutputKind

PROMPT = "Write a short poem about the sea."


def chat_ids(llm: LLM, text: str) -> list[int]:
    return llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": text}], tokenize=True
    )


def greedy(max_tokens=24, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def test_generate_text_and_finish_reasons(llm_fp32):
    out = llm_fp32.generate([chat_ids(llm_fp32, PROMPT)], greedy(8), use_tqdm=False)[0]
    o = out.outputs[0]
    assert len(o.token_ids) == 8 and o.finish_reason == "length"
    assert o.text == llm_fp32.get_tokenizer().decode(o.token_ids)
    assert o.text.strip()
    # The chat model ends its turn with <|im_end|> (its EOS) when given room.
    long = llm_fp32.generate([chat_ids(llm_fp32, "Say hi.")], greedy(200), use_tqdm=False)[0]
    assert long.outputs[0].finish_reason == "stop"
    assert long.outputs[0].token_ids[-1] in llm_fp32.get_tokenizer().eos_token_ids


def test_chat_api_uses_the_template(llm_fp32):
    by_chat = llm_fp32.chat([{"role": "user", "content": PROMPT}], greedy(8), use_tqdm=False)
    by_ids = llm_fp32.generate([chat_ids(llm_fp32, PROMPT)], greedy(8), use_tqdm=False)
    assert by_chat[0].outputs[0].token_ids == by_ids[0].outputs[0].token_ids


def test_stop_string_is_cut_from_the_text(llm_fp32):
    ids = chat_ids(llm_fp32, PROMPT)
    full = llm_fp32.generate([ids], greedy(40), use_tqdm=False)[0].outputs[0].text
    words = full.split()
    stop = words[3]
    out = llm_fp32.generate([ids], greedy(40, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.index(stop)]
    kept = llm_fp32.generate(
        [ids], greedy(40, stop=[stop], include_stop_str_in_output=True), use_tqdm=False
    )[0].outputs[0]
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_stop_token_ids_ignore_eos_and_min_tokens(llm_fp32):
    ids = chat_ids(llm_fp32, "Say hi.")
    free = llm_fp32.generate([ids], greedy(60), use_tqdm=False)[0].outputs[0]
    third = free.token_ids[2]
    out = llm_fp32.generate([ids], greedy(60, stop_token_ids=[third]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids[-1] == third
    assert out.outputs[0].stop_reason == third and out.outputs[0].finish_reason == "stop"
    eos_free = llm_fp32.generate(
        [ids], greedy(len(free.token_ids) + 5, ignore_eos=True), use_tqdm=False
    )[0]
    assert len(eos_free.outputs[0].token_ids) == len(free.token_ids) + 5
    assert eos_free.outputs[0].finish_reason == "length"
    eos = set(llm_fp32.get_tokenizer().eos_token_ids)
    min_out = llm_fp32.generate(
        [ids], greedy(len(free.token_ids) + 20, min_tokens=len(free.token_ids) + 3), use_tqdm=False
    )[0].outputs[0]
    assert len(min_out.token_ids) >= len(free.token_ids) + 3
    assert not eos & set(min_out.token_ids[: len(free.token_ids) + 2])


def test_logprobs_are_consistent(llm_fp32):
    ids = chat_ids(llm_fp32, PROMPT)
    out = llm_fp32.generate([ids], greedy(6, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 6
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry[token].rank == 1  # greedy picks the most likely token
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks == [1, 2, 3]
        assert all(lp.logprob <= 0 for lp in entry.values())
        total += entry[token].logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-6)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SamplingParams(max_tokens=0), "max_tokens"),
        (lambda: SamplingParams(max_tokens=-3), "max_tokens"),
        (lambda: SamplingParams(temperature=-0.5), "temperature"),
        (lambda: SamplingParams(top_p=0.0), "top_p"),
        (lambda: SamplingParams(top_p=1.5), "top_p"),
        (lambda: SamplingParams(top_k=-7), "top_k"),
        (lambda: SamplingParams(logprobs=100), "logprobs"),
    ],
)
def test_bad_sampling_params_name_the_problem(make, message):
    with pytest.raises(InvalidRequestError, match=message):
        make()


def test_bad_prompts_fail_alone_and_the_engine_keeps_serving(llm_fp32):
    engine = llm_fp32.engine
    good = chat_ids(llm_fp32, PROMPT)
    expected = llm_fp32.generate([good], greedy(12), use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("survivor", good, greedy(12))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("e1", "", greedy())
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("e2", [], greedy())
    too_long = [100] * engine.max_model_len
    with pytest.raises(ContextLengthError, match=str(engine.max_model_len)):
        engine.add_request("e3", too_long, greedy())
    with pytest.raises(InvalidRequestError, match="out of range"):
        engine.add_request("e4", [1, 2, 10**9], greedy())
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("survivor", good, greedy())
    result = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "survivor" and out.finished:
                result = out.outputs[0].token_ids
    assert result == expected
    assert engine.stats().kv_cache_usage == 0


def test_abort_midway_frees_blocks(llm_fp32):
    engine = llm_fp32.engine
    engine.add_request("a", chat_ids(llm_fp32, PROMPT), greedy(50))
    engine.add_request("b", chat_ids(llm_fp32, "Count to ten."), greedy(50))
    for _ in range(3):
        engine.step()
    engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().kv_cache_usage == 0
    engine.kv_manager.check_invariants()


def test_output_kinds_report_the_same_result(llm_fp32):
    engine = llm_fp32.engine
    ids = chat_ids(llm_fp32, PROMPT)
    kinds = {"cumulative": OutputKind.CUMULATIVE, "delta": OutputKind.DELTA}
    kinds["final"] = OutputKind.FINAL_ONLY
    for name, kind in kinds.items():
        engine.add_request(name, ids, greedy(12, stop=["\n\n"], logprobs=1), output_kind=kind)
    seen: dict[str, list] = {name: [] for name in kinds}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen["cumulative"]) > 1 and len(seen["delta"]) == len(seen["cumulative"])
    assert len(seen["final"]) == 1 and seen["final"][0].finished
    whole = seen["cumulative"][-1].outputs[0]
    assert seen["final"][0].outputs[0] == whole
    deltas = [out.outputs[0] for out in seen["delta"]]
    assert "".join(d.text for d in deltas) == whole.text
    assert sum((d.token_ids for d in deltas), []) == whole.token_ids
    assert sum((d.logprobs for d in deltas), []) == whole.logprobs
    assert deltas[-1].finish_reason == whole.finish_reason
    assert deltas[-1].cumulative_logprob == whole.cumulative_logprob
    # A cumulative output is a snapshot: later steps do not change what it reported.
    first = seen["cumulative"][0].outputs[0]
    assert len(first.token_ids) == 1 and len(first.logprobs) == 1
    assert engine.kv_manager.usage == 0


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="nope"):
        LLM(model=str(tmp_path / "nope.gguf"))
