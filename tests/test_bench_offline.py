"""`tokenmill bench offline`: forced output lengths, the workload's FLOPs from the shared cost
formulas, and the transformers peer's static batches, on the bundled model."""

from __future__ import annotations

import pytest

from tokenmill.bench import offline
from tokenmill.perf import Precision, model_flops_per_token, step_cost
from tokenmill.workload import build_workload


@pytest.fixture(scope="module")
def arch():
    from tokenmill.bench.serve import open_model_info

    return open_model_info(None).arch


def test_tokenmill_produces_exactly_the_requested_lengths():
    prompts = [[1000 + i, 2000 + i, 3000 + i] for i in range(3)]
    result = offline.run_tokenmill(None, prompts, [5, 1, 9], "float32", kv_cache_memory_gib=0.25)
    assert result.output_tokens == 15 and result.input_tokens == 9
    assert result.elapsed_s > 0 and result.output_throughput == pytest.approx(15 / result.elapsed_s)
    assert result.computed_tokens == (3 + 4) + (3 + 0) + (3 + 8)
    assert result.model_gflop > 0


def test_workload_flops_are_step_cost_of_each_sequence(arch):
    gflop = offline.workload_gflop(arch, [[1] * 10], [4], "bfloat16")
    expected = step_cost(arch, [(13, 0, 4)], Precision("bf16")).flops / 1e9
    assert gflop == pytest.approx(expected)
    # Close to the MFU numerator: every position through the layers, 4 lm_head rows.
    per_token = model_flops_per_token(arch, 1) - 2 * arch.vocab_size * arch.hidden_size
    lower = (13 * per_token + 4 * 2 * arch.vocab_size * arch.hidden_size) / 1e9
    assert lower <= gflop < 1.1 * lower


def test_tokenize_workload_gives_exact_lengths_for_synthetic_prompts():
    workload = build_workload("random:in=20,out=5,range=0.5", 6, seed=1)
    prompts = offline.tokenize_workload(workload, tokenizer=None)
    assert [len(p) for p in prompts] == [r.prompt_len for r in workload.requests]
    assert len({tuple(p) for p in prompts}) == 6  # distinct: no prefix-cache shortcut


def test_left_pad_aligns_prompts_to_the_right():
    ids, mask = offline._left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_markdown_has_a_row_per_engine():
    r = offline.OfflineResult("tokenmill", "bfloat16", 2, 10, 20, 2.0, model_gflop=4.0)
    text = offline.format_offline_markdown([r], matmul_gflops=20.0)
    assert "| tokenmill | bfloat16 | 2 | 10 | 20 | 2.0 | 1.00 | 10.0 | 15.0 | 2.0 | 10% |" in text


@pytest.mark.slow
def test_transformers_peer_forces_lengths_in_static_batches(smollm_path):
    prompts = [[1000, 1001, 1002, 1003], [2000, 2001]]
    result = offline.run_transformers(smollm_path, prompts, [3, 5], "float32", batch_size=2)
    assert result.output_tokens == 8  # useful tokens only
    assert result.computed_tokens == 2 * 4 + 2 * (5 - 1)  # the padded batch runs 5 steps
    assert result.notes["static_batches"] == 1
