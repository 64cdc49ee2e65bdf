"""FLOP and byte counts of the perf model against hand-computed values for a tiny config."""

import pytest

from tokenmill.models.arch_config import ArchConfig
from tokenmill.perf import (
    BatchShape,
    HardwareProfile,
    MemoryTier,
    Precision,
    kv_bytes_per_block,
    kv_bytes_per_token,
    model_flops_per_token,
    num_kv_blocks,
    num_params,
    roofline_time,
    step_cost,
    weight_bytes,
)
from tokenmill.perf.step_cost import RequestShape
from tokenmill.plan.models import get_model

# hidden 8, intermediate 16, 2 layers, 2 heads, 1 KV head, head_dim 4, vocab 32, untied.
TINY = ArchConfig(
    architecture="llama",
    vocab_size=32,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
    max_position_embeddings=64,
)
# A 3-token prefill chunk at the start of a prompt, and a decode token after 5 cached tokens.
BATCH = [(3, 0), (1, 5)]


def test_batch_shape_aggregates():
    b = BatchShape.from_requests(BATCH)
    assert b.num_tokens == 4
    assert b.num_reqs == 2
    # causal pairs: 3 new tokens see 1+2+3 = 6 keys; the decode token sees 5 + 1 = 6
    assert b.num_attn_pairs == 12
    assert b.num_kv_read_tokens == 3 + 6
    assert b.num_logits == 2


def test_flops_by_operator_tiny_config():
    cost = step_cost(TINY, BATCH, Precision(weights="bf16"))
    flops = cost.flops_by_op()
    L = 2
    # T=4 tokens, h=8, qkv_out=(2+2*1)*4=16, q_dim=8, I=16, pairs=12, S=2 logits, V=32
    assert flops["qkv_proj"] == L * 2 * 4 * 8 * 16
    assert flops["attention"] == L * 4 * 2 * 4 * 12  # QK^T and PV: 4 * heads * head_dim/pair
    assert flops["o_proj"] == L * 2 * 4 * 8 * 8
    assert flops["gate_up_proj"] == L * 2 * 4 * 8 * 32
    assert flops["down_proj"] == L * 2 * 4 * 16 * 8
    assert flops["lm_head"] == 2 * 2 * 8 * 32  # only the 2 sampled rows
    per_layer = 128 + 1024 + 144 + 0 + 384 + 512 + 32 + 128 + 2048 + 320 + 1024 + 32
    edges = 0 + 128 + 1024 + 320  # embedding, final norm, lm_head, sampling
    assert cost.flops == L * per_layer + edges == 13024


def test_bytes_by_kind_tiny_config():
    b = step_cost(TINY, BATCH, Precision(weights="bf16")).bytes_by_kind
    # weights per layer (bf16): norms 2*8*2, qkv 16*8*2, o 8*8*2, gate_up 32*8*2, down 8*16*2
    # edges: 4 embedding rows 4*8*2, final norm 8*2, lm_head 32*8*2
    assert b["weights"] == 2 * (32 + 256 + 128 + 512 + 256) + (64 + 16 + 512) == 2960
    # one token's K and V in one layer: 2 * 1 head * 4 * 2 bytes = 16
    assert b["kv_write"] == 2 * 4 * 16
    assert b["kv_read"] == 2 * 9 * 16
    assert b["activations"] == 2 * 2240 + (64 + 128 + 288 + 256) == 5216


def test_weight_bytes_group_scales_and_kv():
    assert weight_bytes(TINY, "bf16") == 2 * (32 + 256 + 128 + 512 + 256) + 2 * 512 + 16
    # int4: half a byte per weight plus one bf16 scale per row (rows shorter than a group)
    linears = (64 + 16 * 2) + (32 + 8 * 2) + (128 + 32 * 2) + (64 + 8 * 2)
    assert weight_bytes(TINY, "int4") == 2 * (linears + 32) + 2 * 512 + 16 == 1936
    assert kv_bytes_per_token(TINY, "bf16") == 2 * 16
    assert kv_bytes_per_token(TINY, "fp8") == 2 * 8
    # int8 KV: 4 bytes + one bf16 scale per (token, head) vector, K and V, 2 layers
    assert kv_bytes_per_token(TINY, "int8") == 2 * 2 * (4 + 2)


def test_kv_blocks_in_a_memory_budget():
    # A block of 16 tokens: K and V, 1 head of 4 elements, 2 layers; fp32 = 4 bytes each.
    assert kv_bytes_per_block(TINY, 16, "float32") == 2 * 2 * 16 * 1 * 4 * 4 == 1024
    assert kv_bytes_per_block(TINY, 16, "bfloat16") == kv_bytes_per_block(TINY, 16, "bf16") == 512
    assert num_kv_blocks(TINY, 16, "float32", 1.0) == 2**30 // 1024
    assert num_kv_blocks(TINY, 16, "float32", 1e-9) == 1  # always at least one block


def test_which_requests_run_prompt_tokens():
    assert RequestShape(3, 0).is_prompt  # a prompt's first chunk
    assert RequestShape(64, 128, 0).is_prompt  # a later chunk that samples nothing yet
    assert not RequestShape(1, 40).is_prompt  # a decode
    assert not RequestShape(5, 40, 5).is_prompt  # verifying 4 drafts samples every token
    b = BatchShape.from_requests([RequestShape(64, 128, 0), (1, 40), (5, 40, 5)])
    assert (b.num_prefill_tokens, b.num_prefill_reqs, b.num_logits) == (64, 1, 6)
    assert b.has_prompt_tokens and not BatchShape.from_requests([(1, 40)]).has_prompt_tokens


def test_published_parameter_counts():
    assert num_params(get_model("llama-3.1-8b").arch) == pytest.approx(8.03e9, rel=1e-3)
    assert num_params(get_model("llama-3.1-70b").arch) == pytest.approx(70.55e9, rel=1e-3)
    assert num_params(get_model("smollm2-135m").arch) == pytest.approx(134.5e6, rel=1e-2)
    assert kv_bytes_per_token(get_model("llama-3.1-8b").arch) == 131072


def test_model_flops_per_token():
    # 2 * matmul params + 4 * layers * heads * head_dim * context
    matmul = 2 * (16 * 8 + 8 * 8 + 32 * 8 + 8 * 16) + 32 * 8
    assert model_flops_per_token(TINY, 10) == 2 * matmul + 4 * 2 * 2 * 4 * 10


def test_bandwidth_bound_decode_time_is_weight_bytes_over_bandwidth():
    arch = get_model("llama-3.1-8b").arch
    bandwidth = 3.35e12
    profile = HardwareProfile(
        "ideal", (MemoryTier("hbm", 80e9, bandwidth),), {"bf16": 1e18}
    )  # compute effectively free, no overheads
    cost = step_cost(arch, [(1, 0)], Precision(weights="bf16"))
    t = roofline_time(cost, profile)
    assert t.bound == "memory"
    assert t.seconds == pytest.approx(cost.total_bytes / bandwidth, rel=1e-12)
    # A decode step streams every weight once, except that it gathers one embedding row.
    table = arch.vocab_size * arch.hidden_size * 2
    streamed = weight_bytes(arch, "bf16") - table + arch.hidden_size * 2
    assert cost.bytes_by_kind["weights"] == pytest.approx(streamed)
    assert t.seconds == pytest.approx(streamed / bandwidth, rel=1e-3)


def test_fixed_function_attention_unit_takes_attention_flops():
    from tokenmill.perf import AttentionUnit

    arch = get_model("llama-3.1-8b").arch
    tier = (MemoryTier("hbm", 80e9, 1e18),)  # memory effectively free
    plain = HardwareProfile("p", tier, {"bf16": 1e15})
    unit = HardwareProfile("u", tier, {"bf16": 1e15}, attention_unit=AttentionUnit(1e17))
    cost = step_cost(arch, [(1, 100_000)] * 8)
    assert roofline_time(cost, unit).seconds < roofline_time(cost, plain).seconds


def test_unknown_dtype_is_a_config_error():
    from tokenmill.errors import ConfigError

    with pytest.raises(ConfigError, match="known"):
        Precision(weights="int3")
