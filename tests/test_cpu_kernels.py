"""The native CPU GEMM against PyTorch's, and the dispatch that picks it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.attention.backends.cpu_kernels import cpu_kernels
from tokenmill.models import linear_ops


@pytest.fixture(scope="module")
def kernels():
    k = cpu_kernels()
    assert k is not None, "the native CPU kernels failed to build"
    if not k.has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    return k


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 64, 129])
@pytest.mark.parametrize("shape", [(960, 576), (48, 1536), (16, 2)])
def test_packed_gemm_matches_fp32_reference(kernels, rows, shape):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(shape, generator=gen).bfloat16()
    x = torch.randn(rows, shape[1], generator=gen).bfloat16()
    got = kernels.gemm_bf16_packed(x, kernels.pack_bf16_weight(w))
    expected = x.float() @ w.float().T
    # Both sides hold the exact bf16 products; only fp32 summation order and the final
    # rounding to bf16 (2^-8 relative) differ.
    torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(got, F.linear(x, w), atol=1e-2, rtol=8e-3)


def test_linear_dispatch_uses_packed_weights_and_bias(kernels):
    w = torch.nn.Parameter(torch.randn(64, 96).bfloat16())
    b = torch.randn(64).bfloat16()
    x = torch.randn(3, 96).bfloat16()
    y = linear_ops.linear(x, w, b)
    assert getattr(w, linear_ops._PACKED_ATTR) is not None
    torch.testing.assert_close(y, F.linear(x, w, b), atol=2e-2, rtol=1e-2)
    # Shapes the kernel cannot take, and other dtypes, go to PyTorch.
    odd = torch.randn(10, 96).bfloat16()
    torch.testing.assert_close(linear_ops.linear(x, odd), F.linear(x, odd))
    xh, wh = torch.randn(3, 96).half(), torch.randn(64, 96).half()
    assert torch.equal(linear_ops.linear(xh, wh), F.linear(xh, wh))


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 64, 129])
@pytest.mark.parametrize("shape", [(960, 576), (48, 1536), (16, 3)])
def test_packed_fp32_gemm_matches_the_library(rows, shape):
    k = cpu_kernels()
    if k is None or not k.has_avx512f():
        pytest.skip("this CPU has no AVX-512")
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(shape, generator=gen)
    x = torch.randn(rows, shape[1], generator=gen)
    got = k.gemm_f32_packed(x, k.pack_f32_weight(w))
    # Only the fp32 summation order differs from the float64 product.
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, atol=1e-4, rtol=1e-5)
    wp = torch.nn.Parameter(w)
    torch.testing.assert_close(linear_ops.linear(x, wp), F.linear(x, w), atol=1e-4, rtol=1e-5)
    assert getattr(wp, linear_ops._PACKED_ATTR) is not None


def test_bfloat16_model_is_as_accurate_as_with_library_matmuls(
    kernels, monkeypatch, llm_fp32, sharegpt_prompts
):
    """Against the float32 model, bf16 with the native GEMM errs no more than bf16 with
    PyTorch's matmuls (both hold exact bf16 products; they differ in summation order)."""
    from tokenmill import LLM, SamplingParams

    llm = LLM(dtype="bfloat16", kv_cache_memory_gib=0.25)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.encode(p)[:120] for p in sharegpt_prompts[:6]]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)

    def prompt_logprobs(engine):
        outs = engine.generate(prompts, params, use_tqdm=False)
        return [e for o in outs for e in o.prompt_logprobs[1:]]

    reference = prompt_logprobs(llm_fp32)
    native = prompt_logprobs(llm)
    monkeypatch.setattr(linear_ops, "_native_gemm", lambda dtype: None)
    library = prompt_logprobs(llm)

    def mean_error(entries):
        # Error of the logprob each model gives the reference's top token.
        errors = []
        for ref, got in zip(reference, entries, strict=True):
            token, lp = min(ref.items(), key=lambda kv: kv[1].rank)
            if token in got:
                errors.append(abs(got[token].logprob - lp.logprob))
        return sum(errors) / len(errors)

    assert mean_error(native) <= 1.25 * mean_error(library) + 1e-3


def test_fused_decode_layer_is_as_accurate_as_eager_bfloat16(kernels, llm_fp32, sharegpt_prompts):
    """The second token of each request is computed by a pure-decode step: fused (one native
    call per layer) or eager. Against float32, the fused step errs no more than eager bf16."""
    from tokenmill import LLM, SamplingParams

    tokenizer = llm_fp32.get_tokenizer()
    prompts = [tokenizer.encode(p)[:100] for p in sharegpt_prompts[10:18]]
    params = SamplingParams(max_tokens=2, temperature=0, logprobs=20, ignore_eos=True)
    fused_llm = LLM(dtype="bfloat16", kv_cache_memory_gib=0.25)
    assert fused_llm.engine.runner.fused_decode is not None
    eager_llm = LLM(dtype="bfloat16", kv_cache_memory_gib=0.25, cpu_fused_decode=False)
    runs = {
        name: llm.generate(prompts, params, use_tqdm=False)
        for name, llm in (("ref", llm_fp32), ("fused", fused_llm), ("eager", eager_llm))
    }
    errors: dict[str, list[float]] = {"fused": [], "eager": []}
    for i in range(len(prompts)):
        ref = runs["ref"][i].outputs[0]
        firsts = {runs[n][i].outputs[0].token_ids[0] for n in runs}
        if len(firsts) > 1:
            continue  # the prefill already chose differently: the decode inputs differ
        for name in errors:
            got = runs[name][i].outputs[0].logprobs[1]
            for token, lp in ref.logprobs[1].items():
                if token in got:
                    errors[name].append(abs(got[token].logprob - lp.logprob))
    assert len(errors["fused"]) > 50
    mean = {name: sum(v) / len(v) for name, v in errors.items()}
    print("mean |dlogprob| vs float32:", mean)
    assert mean["fused"] <= 1.25 * mean["eager"] + 1e-3, mean
