import random

import pytest

from tokenmill.errors import ConfigError
from tokenmill.perf import Precision, StepRecord, roofline_time, step_cost
from tokenmill.plan.calibrate import fit_trace, profile_dict, write_calibration
from tokenmill.plan.hardware import get_hardware, spec_from_dict
from tokenmill.plan.models import get_model

ARCH = get_model("smollm2-135m").arch
FP32 = Precision(weights="fp32")
TRUE = dict(per_step=0.004, per_req=0.0002, flops_s=50e9, bytes_s=8e9)


def _synthetic_trace(noise: float, exact_shapes: bool, n: int = 200) -> list[StepRecord]:
    rng = random.Random(1)
    records = []
    for _ in range(n):
        shapes = [(1, rng.randint(10, 900), 1) for _ in range(rng.randint(1, 16))]
        if rng.random() < 0.3:
            shapes.append((rng.randint(16, 512), 0, 1))
        cost = step_cost(ARCH, shapes, FP32)
        t = (
            TRUE["per_step"]
            + TRUE["per_req"] * len(shapes)
            + cost.flops / TRUE["flops_s"]
            + cost.total_bytes / TRUE["bytes_s"]
        ) * (1 + rng.gauss(0, noise))
        prefill = sum(n for n, c, _ in shapes if c == 0)
        records.append(
            StepRecord(
                prefill,
                len(shapes) - (prefill > 0),
                len(shapes),
                sum(n + c for n, c, _ in shapes),
                t,
                shapes=tuple(shapes) if exact_shapes else (),
            )
        )
    return records


def test_fit_recovers_a_known_machine_exactly():
    fit = fit_trace(_synthetic_trace(0.0, True), ARCH, FP32)
    assert fit.per_step_s == pytest.approx(TRUE["per_step"], rel=1e-6)
    assert fit.per_request_s == pytest.approx(TRUE["per_req"], rel=1e-6)
    assert fit.flops_per_s == pytest.approx(TRUE["flops_s"], rel=1e-6)
    assert fit.bytes_per_s == pytest.approx(TRUE["bytes_s"], rel=1e-6)
    assert fit.rel_rms_error < 1e-9


def test_fit_with_noise_and_aggregate_shapes_predicts_within_a_few_percent():
    fit = fit_trace(_synthetic_trace(0.03, False), ARCH, FP32)
    assert fit.median_abs_rel_error < 0.05
    assert fit.flops_per_s == pytest.approx(TRUE["flops_s"], rel=0.25)
    assert fit.bytes_per_s == pytest.approx(TRUE["bytes_s"], rel=0.25)


def test_fitted_profile_reproduces_step_times(tmp_path, monkeypatch):
    records = _synthetic_trace(0.0, True, n=50)
    fit = fit_trace(records, ARCH, FP32)
    raw = profile_dict(fit, "synthetic.jsonl", FP32)
    profile = spec_from_dict(raw, "fit").profile
    for rec in records[:10]:
        cost = step_cost(ARCH, rec.batch_shape(), FP32)
        assert roofline_time(cost, profile).seconds == pytest.approx(rec.wall_time_s, rel=1e-6)
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    write_calibration(raw)
    spec = get_hardware("this-machine")
    assert spec.calibrated is True and "[fitted]" in spec.sources["memory.ram.bandwidth_gb_s"]


def test_too_short_a_trace_is_refused():
    with pytest.raises(ConfigError, match="at least 8"):
        fit_trace(_synthetic_trace(0.0, True, n=3), ARCH, FP32)
