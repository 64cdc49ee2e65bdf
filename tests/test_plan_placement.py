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
