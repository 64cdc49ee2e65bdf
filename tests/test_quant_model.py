"""The bundled model computed on its GGUF blocks (and on int8/int4 made from float weights):
greedy output equal to computing the same dequantized weights in float32 except at near-ties,
every weight held once in its packed form, and the fused decode layer agreeing with eager."""

from __future__ import annotations

import pytest
import torch

from tests.test_engine_parity import _parity_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.errors import ConfigError
from tokenmill.quant.packing import QuantizedWeight

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 300, "max_position_embeddings": 128, "tie_word_embeddings": False,
}  # fmt: skip
NEAR_TIE = 1.0  # nats below the reference's best token


@pytest.fixture(scope="module")
def llm_gguf_fp32():
    return LLM(dtype="float32", quantization="gguf", kv_cache_memory_gib=0.25)


def test_greedy_output_equals_float32_dequantized_except_near_ties(
    llm_fp32, llm_gguf_fp32, sharegpt_prompts
):
    tokenizer = llm_fp32.get_tokenizer()
    prompts = [tokenizer.encode(p)[:200] for p in _parity_prompts(sharegpt_prompts)]
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=5, ignore_eos=True)
    ref = llm_fp32.generate(prompts, params, use_tqdm=False)
    got = llm_gguf_fp32.generate(prompts, params, use_tqdm=False)
    equal, gaps = 0, []
    for r, g in zip(ref, got, strict=True):
        r_ids, g_ids = r.outputs[0].token_ids, g.outputs[0].token_ids
        if r_ids == g_ids:
            equal += 1
            continue
        i = next(i for i, (a, b) in enumerate(zip(r_ids, g_ids, strict=False)) if a != b)
        top = r.outputs[0].logprobs[i]  # the reference's five best at the first difference
        assert g_ids[i] in top, "the quantized model chose outside the reference's top five"
        gaps.append(top[r_ids[i]].logprob - top[g_ids[i]].logprob)
    print(f"{equal}/{len(prompts)} equal; gaps to the reference's best where they differ: {gaps}")
    # int8 activations (as llama.cpp computes Q4/Q8 weights) move logits by a few tenths of a
    # nat: greedy paths part where the reference's best two are that close, and only there.
    assert all(gap < NEAR_TIE for gap in gaps), gaps
    assert sorted(gaps)[len(gaps) // 2] < 0.25 if gaps else True, gaps
    assert equal >= len(prompts) // 4


def test_every_weight_is_held_once_packed(llm_gguf_fp32):
    model = llm_gguf_fp32.engine.runner.model
    assert llm_gguf_fp32.engine.runner.quantization == "gguf"
    params = {name for name, _ in model.named_parameters()}
    assert all("norm" in name for name in params), params  # only the float norms remain
    layer = model.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert isinstance(linear.weight, QuantizedWeight)
        assert linear.weight.describe() == "int4-g32" and linear.weight.bits_per_weight == 5.0
    table = model.model.embed_tokens.weight  # Q8_0, also the tied output head
    assert isinstance(table, QuantizedWeight) and table.describe() == "int8-sym-g32"
    assert not hasattr(table, "_tokenmill_packed")


def _mean_logprob_errors(llms: dict[str, LLM], prompts, steps: tuple[int, ...]) -> dict:
    """Mean |logprob - the "ref" engine's| over the reference's top-5 tokens at each step in
    `steps` of a 2-token greedy run, per other engine; prompts whose first token differs are left
    out (the decode inputs differ)."""
    params = SamplingParams(max_tokens=2, temperature=0, logprobs=5, ignore_eos=True)
    runs = {name: llm.generate(prompts, params, use_tqdm=False) for name, llm in llms.items()}
    errors: dict[str, list[float]] = {name: [] for name in llms if name != "ref"}
    for i in range(len(prompts)):
        ref = runs["ref"][i].outputs[0]
        if any(runs[n][i].outputs[0].token_ids[0] != ref.token_ids[0] for n in errors):
            continue
        for step in steps:
            for name in errors:
                got = runs[name][i].outputs[0].logprobs[step]
                errors[name] += [
                    abs(got[t].logprob - lp.logprob)
                    for t, lp in ref.logprobs[step].items()
                    if t in got
                ]
    assert all(len(v) >= 20 * len(steps) for v in errors.values()), errors
    mean = {name: sum(v) / len(v) for name, v in errors.items()}
    print("mean |dlogprob| vs float32:", mean)
    return mean


def test_fused_decode_on_quantized_weights_is_as_accurate_as_eager(llm_gguf_fp32, sharegpt_prompts):
    """The second token comes from a pure-decode step, fused (one native call per layer) or
    eager; against the same weights in float32, the fused step errs no more than eager bf16."""
    fused = LLM(dtype="bfloat16", quantization="gguf", kv_cache_memory_gib=0.1)
    if fused.engine.runner.fused_decode is None:
        pytest.skip("no fused CPU decode on this machine")
    eager = LLM(
        dtype="bfloat16", quantization="gguf", kv_cache_memory_gib=0.1, cpu_fused_decode=False
    )
    prompts = [fused.get_tokenizer().encode(p)[:64] for p in sharegpt_prompts[20:28]]
    llms = {"ref": llm_gguf_fp32, "fused": fused, "eager": eager}
    mean = _mean_logprob_errors(llms, prompts, steps=(1,))
    assert mean["fused"] <= 1.25 * mean["eager"] + 1e-3, mean


def test_16_bit_activations_bring_the_gguf_weights_to_float_accuracy(
    llm_fp32, llm_gguf_fp32, sharegpt_prompts
):
    """gguf-a16 rounds each activation block and its remainder (two integer passes): against the
    same dequantized weights in float32, its logprobs err far less than gguf's int8 activations,
    in the prompt step and in the (fused, where it runs) decode step."""
    a16 = LLM(dtype="float32", quantization="gguf-a16", kv_cache_memory_gib=0.25)
    assert a16.engine.runner.model.model.layers[0].mlp.down_proj.weight.act_bits == 16
    prompts = [a16.get_tokenizer().encode(p)[:64] for p in sharegpt_prompts[30:38]]
    llms = {"ref": llm_fp32, "a8": llm_gguf_fp32, "a16": a16}
    mean = _mean_logprob_errors(llms, prompts, steps=(0, 1))
    assert mean["a16"] < 0.2 * mean["a8"], mean


@pytest.mark.parametrize("scheme", ["int8", "int4-g64-sym"])
def test_float_weights_quantize_on_load(scheme):
    config = TINY_LLAMA
    ref = LLM(load_format="dummy", dummy_config=config, dtype="float32", num_kv_blocks=16)
    llm = LLM(
        load_format="dummy", dummy_config=config, dtype="float32", num_kv_blocks=16,
        quantization=scheme,
    )  # fmt: skip
    model = llm.engine.runner.model
    kinds = {m.weight.describe() for m in model.modules() if hasattr(m, "weight")
             and isinstance(m.weight, QuantizedWeight)}  # fmt: skip
    # Per channel: one group spans a row (64 = hidden, 96 = intermediate, for down_proj).
    layers = {"int8-sym-g64", "int8-sym-g96"} if scheme == "int8" else {"int4-g64"}
    assert kinds == layers | {"int8-sym-g64"}  # the embedding and head: int8 per channel
    assert isinstance(model.lm_head.weight, QuantizedWeight)
    assert model.lm_head.weight.bits == 8  # the head stays 8-bit
    x = torch.arange(12)
    with torch.no_grad():
        ref_logits = ref.engine.runner.model.compute_logits(
            ref.engine.runner.model.model.embed_tokens(x)
        )
        got_logits = model.compute_logits(model.model.embed_tokens(x))
    assert torch.nn.functional.cosine_similarity(ref_logits, got_logits).min() > 0.95


def test_bad_schemes_are_refused_clearly():
    with pytest.raises(ConfigError, match="quantization must be"):
        LLM(quantization="int3")
    with pytest.raises(ConfigError, match="int4 group"):
        LLM(quantization="int4-g48")
    with pytest.raises(ConfigError, match="-a16 needs integer weights"):
        LLM(quantization="none-a16")
    with pytest.raises(ConfigError, match="needs a GGUF model"):
        LLM(load_format="dummy", dummy_config=TINY_LLAMA, quantization="gguf")


def test_quantization_none_is_the_unquantized_model():
    """vLLM's LLM(quantization=None) means no quantization; here too (it raised
    AttributeError), and a non-string is a clear error."""
    from tokenmill.config import ModelConfig

    assert ModelConfig(quantization=None).quantization == "none"
    with pytest.raises(ConfigError, match="quantization must be a string or None"):
        ModelConfig(quantization=4)
