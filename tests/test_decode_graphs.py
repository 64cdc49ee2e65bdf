"""The static-buffer decode path that CUDA graphs replay, run eagerly (no GPU needed): padded
batches of every size give the same tokens and logprobs as the plain path."""

from __future__ import annotations

import os

import pytest

from tokenmill import LLM, SamplingParams

TINY = dict(
    model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256,
)  # fmt: skip


def run(mode: str):
    llm = LLM(
        load_format="dummy", dummy_config=TINY, attention_backend="triton", decode_graphs=mode,
        dtype="float32",
        kv_cache_memory_gib=0.01, max_num_seqs=8,
    )  # fmt: skip
    prompts = [[(7 * i + j) % 500 for j in range(5 + 9 * i)] for i in range(6)]
    # Different lengths: the batch shrinks step by step through several padded sizes.
    params = [
        SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True, logprobs=1)
        for i in range(6)
    ]
    return llm, llm.generate(prompts, params, use_tqdm=False)


def test_static_decode_path_equals_plain_path():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU-less Triton interpreter run (see conftest.py)")
    _, plain = run("off")
    llm, static = run("no-capture")
    assert llm.engine.runner.graphs is not None
    for a, b in zip(plain, static, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for lp_a, lp_b, tok in zip(
            a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids, strict=True
        ):
            assert abs(lp_a[tok].logprob - lp_b[tok].logprob) < 1e-5
    assert llm.engine.stats().kv_cache_usage == 0
