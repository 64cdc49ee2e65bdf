"""SN40L decode on published figures: the tensor-parallel all-reduces run under the weight stream
(`overlap_communication`), so a memory-bound decode step is the HBM roofline at SambaNova's
published 75% of it, not that plus sixteen sockets' link latency."""

import dataclasses

import pytest

from tokenmill.perf import Precision, weight_bytes
from tokenmill.perf.step_cost import BatchShape, RequestShape
from tokenmill.plan.hardware import get_hardware
from tokenmill.plan.models import get_model
from tokenmill.plan.placement import place
from tokenmill.plan.step_time import LayoutStepTime

ONE_DECODE = BatchShape.from_requests([RequestShape(1, 400)])


def _step_s(model: str, hw) -> float:
    arch = get_model(model).arch
    precision = Precision(weights="bf16")
    placement = place(arch, hw, precision, 4000)
    return LayoutStepTime(arch, hw, precision, placement).seconds(ONE_DECODE)


def test_sn40l_decode_is_the_hbm_roofline_at_the_published_efficiency():
    hw = get_hardware("sambanova-sn40l")
    assert hw.overlaps_communication
    hbm = next(t for t in hw.profile.tiers if t.name == "hbm")
    node_bytes_s = 16 * hbm.bandwidth_bytes_s * hbm.efficiency  # 25.6 TB/s x 0.75
    arch = get_model("llama-3.1-70b").arch
    roofline = weight_bytes(arch, Precision(weights="bf16")) / node_bytes_s
    assert _step_s("llama-3.1-70b", hw) == pytest.approx(roofline, rel=0.05)


def test_overlap_never_makes_a_step_slower_and_hides_the_links_at_70b():
    hw = get_hardware("sambanova-sn40l")
    serial = dataclasses.replace(hw, overlaps_communication=False)
    for model in ("llama-3.1-8b", "llama-3.1-70b"):
        assert _step_s(model, hw) <= _step_s(model, serial)
    # 70B: each layer's weights take longer than its two all-reduces, which then cost nothing
    saved = _step_s("llama-3.1-70b", serial) - _step_s("llama-3.1-70b", hw)
    links = hw.scale_up.latency_s * 2 * 2 * 4 * get_model("llama-3.1-70b").arch.num_hidden_layers
    assert saved == pytest.approx(links, rel=0.1)
