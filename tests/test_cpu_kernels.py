"""The native CPU kernels against PyTorch's ops, in both variants (native: AVX-512 where the CPU
has it; portable: AVX2 loops), and the dispatch that picks them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.models import linear_ops
from tokenmill.native import kernels as cpu_kernels
from tokenmill.native import load_variant


@pytest.fixture(scope="module", params=["native", "portable"])
def variant_kernels(request):
    """Each variant's module, whatever TOKENMILL_NATIVE selects (both built by `make test`)."""
    return load_variant(request.param)


@pytest.fixture(scope="module")
def kernels():
    k = cpu_kernels()
    assert k is not None, "the native CPU kernels failed to build"
    if not k.has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    return k


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 64, 129])
@pytest.mark.parametrize("shape", [(960, 576), (48, 1536), (16, 2)])
def test_packed_gemm_matches_fp32_reference(variant_kernels, rows, shape):
    kernels = variant_kernels
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
def test_packed_fp32_gemm_matches_the_library(variant_kernels, rows, shape):
    k = variant_kernels
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(shape, generator=gen)
    x = torch.randn(rows, shape[1], generator=gen)
    got = k.gemm_f32_packed(x, k.pack_f32_weight(w))
    # Only the fp32 summation order differs from the float64 product.
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, atol=1e-4, rtol=1e-5)
    if linear_ops._native_gemm(torch.float32) is None:
        return  # the dispatch below only packs where the loaded variant has AVX-512
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


def _dense_decode_reference(q, k_cache, v_cache, block_table, seq_lens, scale, window):
    """Each request's keys gathered densely, softmax in float64."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, length in enumerate(seq_lens.tolist()):
        keys = k_cache[block_table[b]].flatten(0, 1)[:length].double()  # (L, Hkv, D)
        values = v_cache[block_table[b]].flatten(0, 1)[:length].double()
        lo = max(0, length - window) if window else 0
        for h in range(heads):
            kh = h // (heads // kv_heads)
            weights = torch.softmax(keys[lo:, kh] @ q[b, h].double() * scale, dim=0)
            out[b, h] = weights @ values[lo:, kh]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads, kv_heads, dim, block, lengths, window",
    [
        (9, 3, 64, 16, [1, 15, 16, 17, 160, 37], 0),  # SmolLM2's shape, chunk edges
        (4, 4, 32, 8, [3, 8, 9, 70], 0),  # chunks shorter than 16 (small blocks)
        (8, 2, 128, 32, [33, 64, 5], 20),  # blocks split into chunks; sliding window
        (4, 1, 256, 16, [40, 2], 0),  # one register of accumulators per head
        (6, 2, 80, 16, [21, 50], 0),  # head_dim not a multiple of 32
        (3, 1, 64, 16, [3000], 0),  # one long request: context split into partitions
        (4, 2, 64, 16, [700, 5, 1300], 600),  # partitions, some empty, with a window
        (4, 2, 48, 16, [30, 300], 0),  # a head_dim without specialised passes
    ],
)
def test_paged_decode_attention_matches_dense_reference(
    variant_kernels, heads, kv_heads, dim, block, lengths, window, dtype
):
    k = variant_kernels
    gen = torch.Generator().manual_seed(len(lengths) * dim)
    max_blocks = -(-max(lengths) // block)
    num_blocks = len(lengths) * max_blocks + 3
    # Blocks handed out shuffled, as a real pool would.
    table = torch.randperm(num_blocks, generator=gen)[: len(lengths) * max_blocks]
    table = table.view(len(lengths), max_blocks).to(torch.int64)
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=gen).to(dtype)
    q = torch.randn(len(lengths), heads, dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int64)
    scale = dim**-0.5
    got = k.paged_decode_attention(q, k_cache, v_cache, table, seq_lens, scale, window)
    expected = _dense_decode_reference(q, k_cache, v_cache, table, seq_lens, scale, window)
    tol = 2e-5 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


def test_native_argmax_is_the_first_largest_and_skips_nans(variant_kernels):
    from tokenmill.worker.sampler import greedy_tokens

    assert cpu_kernels() is not None, "the native CPU kernels failed to build"
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        for vocab in (1, 15, 16, 49152, 50001):
            x = torch.randn(5, vocab, generator=gen).to(dtype)
            x[0, vocab // 2] = 40.0
            x[0, vocab - 1] = 40.0  # a tie: the first one wins, as in torch.argmax
            x[1, 0] = float("nan")  # a NaN never wins...
            x[2, vocab - 1] = float("nan")  # ...not even as the last entry (the scalar tail)
            expected = torch.nan_to_num(x.float(), nan=-1e30).argmax(dim=-1)
            assert torch.equal(greedy_tokens(x), expected), (dtype, vocab)
            assert torch.equal(variant_kernels.argmax_last_dim(x), expected), (dtype, vocab)


def test_masked_argmax_equals_a_masked_fill_then_argmax(variant_kernels):
    """Rows with a grammar bitmask pick the first largest allowed entry (0 when none is a
    number); tokens past the bitmask are never allowed; the other rows are plain argmaxes."""
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16):
        for vocab, num_words in ((15, 1), (16, 1), (49152, 1536), (50001, 1563), (50001, 1500)):
            x = torch.randn(7, vocab, generator=gen).to(dtype)
            width = min(vocab, 32 * num_words)  # tokens past the bitmask: never allowed
            density = torch.tensor([0.9, 0.5, 0.001, 0.0, 1.0, 0.01])[:, None]
            bits = torch.rand(6, 32 * num_words, generator=gen) < density  # masked rows
            bits[3] = False  # nothing allowed: 0
            bits[4, : width - 1] = False  # only the last token inside the bitmask...
            x[4, width - 1] = float("nan")  # ...and it is NaN: 0
            x[6, width - 1] = float("nan")  # a NaN among allowed tokens never wins
            rows = torch.tensor([0, 1, 2, 3, 4, 6])  # row 5 is free
            weights = (1 << torch.arange(32, dtype=torch.int64)).view(1, 1, 32)
            words = (bits.view(6, num_words, 32).long() * weights).sum(-1)
            allowed = words.to(torch.int32)  # wraps bit 31 into the sign, as llguidance's do
            ref = torch.nan_to_num(x.float(), nan=float("-inf"))
            for j, r in enumerate(rows.tolist()):
                keep = torch.zeros(vocab, dtype=torch.bool)
                keep[:width] = bits[j, :width]
                ref[r, ~keep] = float("-inf")
            expected = torch.where(
                ref.max(dim=-1).values > float("-inf"), ref.argmax(dim=-1), torch.zeros(7).long()
            )
            got = variant_kernels.argmax_last_dim_masked(x, rows, allowed.contiguous())
            assert torch.equal(got, expected), (dtype, vocab, num_words, got, expected)


def test_fused_lm_head_argmax_equals_the_argmax_of_the_bf16_logits():
    from tokenmill.models.linear_ops import linear, linear_argmax

    kernels = cpu_kernels()
    if kernels is None or not kernels.has_avx512_bf16():
        pytest.skip("native bf16 GEMM unavailable")
    gen = torch.Generator().manual_seed(5)
    for rows, vocab, dim in ((16, 49152, 576), (130, 4096, 64), (17, 16, 32)):
        w = (torch.randn(vocab, dim, generator=gen) * 0.05).bfloat16()
        x = torch.randn(rows, dim, generator=gen).bfloat16()
        x[0] = w[vocab - 1] * 8  # row 0 points at the last column...
        w[vocab // 2] = w[vocab - 1]  # ...which has an identical twin earlier: the first wins
        x[1, 0] = float("inf")  # inf * a zero-free column: +-inf logits; inf - inf: NaN
        expected = kernels.argmax_last_dim(linear(x, w))
        got = linear_argmax(x, w)
        assert torch.equal(got, expected), (rows, vocab, dim)
        assert got[0] == vocab // 2
    # Few rows: the plain GEMM and argmax (the product is small next to the weight).
    assert linear_argmax(torch.randn(2, 32).bfloat16(), torch.randn(64, 32).bfloat16()) is None


def test_native_rms_norm_matches_float32_math():
    from tokenmill.models.linear_ops import rms_norm

    gen = torch.Generator().manual_seed(4)
    for width in (576, 24, 1000):
        x = (torch.randn(2, 7, width, generator=gen) * 3).bfloat16()
        w = torch.randn(width, generator=gen).bfloat16()
        ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
        got = rms_norm(x, w, 1e-5)
        assert got.shape == x.shape and got.dtype == torch.bfloat16
        # Computed in float32 and rounded once to bf16.
        torch.testing.assert_close(got.float(), ref, atol=1e-2, rtol=8e-3)
