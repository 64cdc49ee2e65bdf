"""Float weights held once (linear_ops.PackedWeight): on the CPU with native GEMMs, each layer's
weight and a tied embedding table live only as the GEMM's panels, not as a float copy beside
them; lookups, products and the fallbacks read the panels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill import LLM, SamplingParams
from tokenmill.models import linear_ops
from tokenmill.models.layers import Linear
from tokenmill.models.linear_ops import PackedEmbedding, PackedWeight
from tokenmill.quant_eval.memory import measure_memory

DTYPES = [torch.bfloat16, torch.float32]


def packs(dtype: torch.dtype) -> bool:
    return linear_ops._native_gemm(dtype) is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_panels_give_back_the_weight_its_rows_and_its_products(dtype):
    if not packs(dtype):
        pytest.skip(f"no native {dtype} GEMM here")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=gen).to(dtype)
    packed = linear_ops.pack_weight(w)
    assert isinstance(packed, PackedWeight) and packed.shape == (48, 40)
    assert packed.packed.numel() == w.numel()  # a permutation: no padding, no copy beside it
    assert torch.equal(packed.unpack(), w)
    ids = torch.tensor([[0, 17, 47], [31, 16, 15]])
    assert torch.equal(packed.rows(ids), F.embedding(ids, w))
    x = torch.randn(2, 3, 40, generator=gen).to(dtype)  # any leading dims
    bias = torch.randn(48, generator=gen).to(dtype)
    tol = {"atol": 2e-2, "rtol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(linear_ops.linear(x, packed, bias), F.linear(x, w, bias), **tol)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16  # unpacked fallback
    torch.testing.assert_close(
        linear_ops.linear(x.to(other), packed), F.linear(x.to(other), w.to(other))
    )


def test_a_linear_swaps_its_float_weight_for_the_panels_on_first_use():
    if not packs(torch.bfloat16):
        pytest.skip("no native bf16 GEMM here")
    layer = Linear(32, 64, bias=False).to(torch.bfloat16)
    w = layer.weight.detach().clone()
    x = torch.randn(5, 32).bfloat16()
    y = layer(x)
    assert isinstance(layer.weight, PackedWeight) and "weight" not in dict(layer.named_parameters())
    torch.testing.assert_close(y, F.linear(x, w), atol=2e-2, rtol=1e-2)
    assert torch.equal(layer(x), y)
    odd = Linear(32, 10, bias=False).to(torch.bfloat16)  # rows not a multiple of 16: PyTorch's
    odd(x)
    assert isinstance(odd.weight, torch.nn.Parameter)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bundled_model_holds_each_weight_once(dtype):
    """Resident weight storage (quant_eval.memory: parameters, buffers and everything hung on
    them, packed copies included) equals one copy of the model's elements; the tied table's
    lookups and the head read the same panels."""
    if not packs(getattr(torch, dtype)):
        pytest.skip(f"no native {dtype} GEMM here")
    llm = LLM(dtype=dtype, kv_cache_memory_gib=0.05)
    model = llm.engine.runner.model  # warmed up: every weight has been used
    weights = {id(m.weight): m.weight for m in model.modules() if hasattr(m, "weight")}
    elements = sum(w.packed.numel() if isinstance(w, PackedWeight) else w.numel()
                   for w in weights.values())  # fmt: skip
    assert 130e6 < elements < 140e6  # SmolLM2-135M
    size = torch.finfo(getattr(torch, dtype)).bits // 8
    assert measure_memory(llm.engine).weight_bytes == elements * size
    assert isinstance(model.model.embed_tokens, PackedEmbedding)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(isinstance(m.weight, PackedWeight) for m in linears)
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0))
    assert "Paris" in out[0].outputs[0].text
