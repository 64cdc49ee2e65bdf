import math

import pytest

from tokenmill.perf import Precision, weight_bytes
from tokenmill.plan.hardware import get_hardware
from tokenmill.plan.models import get_model
from tokenmill.plan.placement import PlacementError, place, tp_candidates


def _place(model, hw, weights="bf16", kv_tokens=32 * 2000, **kw):
    return place(
        get_model(model).arch, get_hardware(hw), Precision(weights=weights), kv_tokens, **kw
    )


def test_small_model_fits_one_gpu():
    pl = _place("llama-3.1-8b", "h100")
    assert (pl.num_chips, pl.tp, pl.pp) == (1, 1, 1)
    assert pl.kv_capacity_tokens > 32 * 2000
    assert "1 chip per replica" in pl.explanation


def test_70b_on_groq_needs_hundreds_of_sram_chips():
    arch = get_model("llama-3.1-70b").arch
    hw = get_hardware("groq-lpu")
    for weights, at_least in (("fp8", 300), ("bf16", 600)):
        pl = _place("llama-3.1-70b", "groq-lpu", weights)
        lower_bound = weight_bytes(arch, weights) / hw.profile.state_capacity_bytes()
        assert pl.num_chips >= max(at_least, math.ceil(lower_bound))
        assert pl.num_chips < 2000
        assert pl.pp > 1 and pl.tp > 1
        assert sum(s.num_layers for s in pl.stages) == arch.num_hidden_layers
        for st in pl.stages:  # every chip within its SRAM
            assert st.weight_bytes_per_chip <= pl.chip_capacity_bytes


def test_70b_on_wafers_needs_a_few_systems():
    pl = _place("llama-3.1-70b", "cerebras-wse3", kv_tokens=8 * 4096)
    assert 4 <= pl.num_chips <= 5
    assert pl.tp == 1  # one wafer per scale-up domain: pipeline only


def test_gpu_tensor_parallel_within_node_and_asked_chips():
    arch = get_model("llama-3.1-70b").arch
    assert tp_candidates(arch, get_hardware("h100")) == [1, 2, 4, 8]
    pl = _place("llama-3.1-70b", "h100", chips=8)
    assert (pl.tp, pl.pp, pl.num_chips) == (8, 1, 8)
    pl = _place("llama-3.1-70b", "h100", chips=16)
    assert (pl.tp, pl.pp) == (8, 2)
    assert "scale-out" in pl.explanation


def test_cannot_fit_says_by_how_much():
    with pytest.raises(PlacementError, match=r"short by [\d.,]+ GB \(at least 3 chips\)"):
        _place("llama-3.1-70b", "h100", chips=1)
    with pytest.raises(PlacementError, match="tp=3"):
        _place("llama-3.1-70b", "h100", tp=3)


def _run(**kw):
    from tokenmill.plan.planner import PlanRequest, run_plan

    return run_plan(PlanRequest(**{"model": "llama-3.1-8b", "hardware": "h100", **kw}))


def test_fixed_chips_queue_what_the_kv_cache_cannot_hold():
    """600 users of 1,020-token requests need ~80 GB of KV; one H100 holds ~56 GB after the
    weights. Like the engine, the plan admits what fits and queues the rest."""
    r = _run(
        workload="fixed:in=1000,out=20", concurrency=600, num_prompts=600, chips=1,
        max_num_seqs=1024,
    )  # fmt: skip
    fit = r.placement.kv_capacity_tokens // 1020
    assert 300 < fit < 600
    assert f"holds {fit} of the 600 sequences" in " ".join(r.notes)
    assert r.metrics.num_requests == 600  # all served, the rest after a wait
    with pytest.raises(PlacementError, match="short by"):  # the weights alone do not fit
        _run(model="llama-3.1-70b", workload="fixed:in=1000,out=20", concurrency=8, chips=1)


def test_placement_is_sized_by_the_requests_that_can_be_in_flight():
    # 100,000 users but 10 requests: KV for 10 sequences, one GPU
    r = _run(workload="fixed:in=1000,out=100", concurrency=100_000, num_prompts=10)
    assert r.placement.num_chips == 1
    assert "KV sized for 10 sequences" in r.notes[0]
    # at a rate: Little's law, not a fixed guess; a light load needs few sequences
    light, heavy = (_run(workload="fixed:in=1000,out=20", rate=x, num_prompts=16) for x in (1, 60))
    seqs = [int(x.notes[0].split()[3]) for x in (light, heavy)]
    assert seqs[0] == 1 and 5 < seqs[1] < 32


def test_vendor_node_is_the_default_unit():
    pl = _place("llama-3.1-405b", "sambanova-sn40l", kv_tokens=4000)
    assert (pl.tp, pl.pp, pl.num_chips) == (16, 1, 16)  # one SN40L-16 node, not 15 stages
    assert "whole 16-chip nodes" in pl.explanation
    pl = _place("llama-3.1-70b", "groq-lpu", "fp8", kv_tokens=4000)
    assert pl.num_chips % 8 == 0  # GroqNodes of 8 cards
