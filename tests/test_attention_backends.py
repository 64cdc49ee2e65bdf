"""Attention backends against a dense float64 reference, on a mixed batch over a paged cache:
a fresh prompt, a prefill chunk after cached context, and decodes, with GQA and sliding windows.
The Triton kernel runs on the CPU through TRITON_INTERPRET=1 when triton is installed."""

from __future__ import annotations

import os

import pytest
import torch

from tokenmill.attention.backends.base import AttentionSpec
from tokenmill.attention.backends.torch_backend import TorchAttentionBackend
from tokenmill.engine.interfaces import ScheduledRequest
from tokenmill.worker.input_batch import prepare_inputs

BLOCK = 16
NUM_BLOCKS = 48


def make_step(requests: list[tuple[int, ...]], gen: torch.Generator, device="cpu"):
    """requests: (num_computed, num_new[, num_drafts]): a decode verifying drafts has num_new =
    1 + num_drafts. Blocks are handed out shuffled, as a real pool would."""
    order = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    scheduled, tables = [], []
    for i, (computed, new, *drafts) in enumerate(requests):
        num_blocks = -(-(computed + new) // BLOCK)
        blocks, order = order[:num_blocks], order[num_blocks:]
        spec = [1] * (drafts[0] if drafts else 0)
        scheduled.append(
            ScheduledRequest(f"r{i}", [1] * new, computed, blocks, do_sample=True,
                             spec_token_ids=spec)
        )  # fmt: skip
        tables.append(blocks)
    return prepare_inputs(scheduled, tables, BLOCK, torch.device(device), lambda _: False).metadata


def dense_reference(spec, q, k, v, kv_cache, md, requests):
    """Per request: all keys (cached + new) gathered densely, softmax in float64."""
    out = torch.zeros_like(q, dtype=torch.float64)
    groups = spec.num_queries_per_kv
    for b, (computed, new, *_) in enumerate(requests):
        start = md.query_start_loc_list[b]
        blocks = md.block_table[b]
        keys = kv_cache[0][blocks].flatten(0, 1)[: computed + new].double()  # (L, Hkv, D)
        values = kv_cache[1][blocks].flatten(0, 1)[: computed + new].double()
        keys[computed:] = k[start : start + new].double()
        values[computed:] = v[start : start + new].double()
        for i in range(new):
            pos = computed + i
            lo = 0 if spec.sliding_window is None else max(0, pos - spec.sliding_window + 1)
            for h in range(spec.num_heads):
                kh = h // groups
                scores = keys[lo : pos + 1, kh] @ q[start + i, h].double() * spec.scale
                weights = torch.softmax(scores, dim=0)
                out[start + i, h] = weights @ values[lo : pos + 1, kh]
    return out


CASES = [
    # (heads, kv_heads, head_dim, window, [(computed, new), ...])
    (4, 4, 32, None, [(0, 37), (50, 1), (20, 19), (3, 1)]),
    (6, 2, 64, None, [(0, 5), (33, 1), (64, 16), (0, 1), (100, 1)]),
    (3, 1, 64, 24, [(0, 40), (70, 1), (30, 20)]),
    # Long chunks: the large prefill tiles, each spanning several cache blocks.
    (4, 2, 32, None, [(0, 90), (40, 70), (5, 1)]),
    # Drafts verified beside a fresh prompt and a short chunk (decode rows, one a query; the
    # chunk is a segment), across a window.
    (3, 1, 64, 24, [(0, 12), (40, 5, 4), (26, 3, 2), (9, 1), (60, 5), (30, 17, 16)]),
]


def run_case(backend, case, dtype=torch.float32, device="cpu"):
    """Returns (backend output, float64 reference), both on the CPU."""
    heads, kv_heads, dim, window, requests = case
    gen = torch.Generator().manual_seed(0)
    md = make_step(requests, gen, device)
    spec = AttentionSpec(0, heads, kv_heads, dim, dim**-0.5, sliding_window=window)
    total = md.num_tokens
    q = torch.randn(total, heads, dim, generator=gen).to(dtype)
    k = torch.randn(total, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(total, kv_heads, dim, generator=gen).to(dtype)
    cache = torch.randn(2, NUM_BLOCKS, BLOCK, kv_heads, dim, generator=gen).to(dtype)
    md_cpu = make_step(requests, torch.Generator().manual_seed(0))
    expected = dense_reference(spec, q, k, v, cache.clone(), md_cpu, requests)
    q, k, v, cache = (t.to(device) for t in (q, k, v, cache))
    got = backend.forward(spec, q, k, v, cache, md)
    return got.double().cpu(), expected


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_native", [False, True])
def test_torch_backend_matches_dense_reference(case, use_native):
    if use_native:
        from tokenmill.native import kernels

        assert kernels() is not None, "the native CPU kernels failed to build"
    got, expected = run_case(TorchAttentionBackend(use_native=use_native), case)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_drafts_being_verified_are_attended_as_decode_rows():
    from tokenmill.attention.backends.torch_backend import MAX_ROW_QUERIES, _plan_for

    requests = [(0, 12), (40, 5, 4), (26, 3, 2), (9, 1), (60, 5), (30, 17, 16)]
    md = make_step(requests, torch.Generator().manual_seed(0))
    plan = _plan_for(md, None)
    # Prompt chunks stay segments (a fresh one, one after cached context, and a verify with
    # more than MAX_ROW_QUERIES queries); the drafts and the plain decode are rows.
    assert MAX_ROW_QUERIES < 17
    assert [(seg.num_computed, seg.end - seg.start) for seg in plan.segments] == [
        (0, 12),
        (60, 5),
        (30, 17),
    ]
    assert plan.decode.seq_lens.tolist() == [41, 42, 43, 44, 45, 27, 28, 29, 10]


def test_native_decode_kernel_in_bfloat16():
    got, expected = run_case(TorchAttentionBackend(use_native=True), CASES[1], torch.bfloat16)
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_prefill_pads_sdpa_to_a_few_shapes(case, monkeypatch):
    """CPU SDPA in bf16 caches a JIT kernel per query/key block shape forever: every prefill
    reaches it padded to multiples of SDPA_PAD, with the same result as the reference."""
    from tokenmill.attention.backends import torch_backend

    seen, sdpa = [], torch_backend.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.shape[2], k.shape[2]))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch_backend.F, "scaled_dot_product_attention", spy)
    got, expected = run_case(TorchAttentionBackend(use_native=True), case, torch.bfloat16)
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)
    assert seen, "no prefill segment reached SDPA"
    assert all(n % torch_backend.SDPA_PAD == 0 for shape in seen for n in shape), seen


@pytest.mark.parametrize("case", CASES)
def test_triton_kernel_matches_dense_reference(case):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and not in Triton's interpreter (see conftest.py)")
    from tokenmill.attention.backends.triton_backend import TritonAttentionBackend

    got, expected = run_case(TritonAttentionBackend(), case)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
