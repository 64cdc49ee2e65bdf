import random

import pytest

from tokenmill.errors import ConfigError
from tokenmill.perf import Precision, StepRecord, roofline_time, step_cost
from tokenmill.perf.trace import write_trace
from tokenmill.plan.calibration.fit import StepFeatures, fit_trace
from tokenmill.plan.calibration.profile import profile_dict, read_calibration, write_calibration
from tokenmill.plan.calibration.run import fit_calibration
from tokenmill.plan.calibration.scenarios import CalibrationSettings, CalibrationTrace, Scenario
from tokenmill.plan.hardware import get_hardware, spec_from_dict
from tokenmill.plan.models import get_model
from tokenmill.plan.placement import place
from tokenmill.plan.step_time import LayoutStepTime

ARCH = get_model("smollm2-135m").arch
FP32 = Precision(weights="fp32")
TRUE = dict(per_step=0.004, per_req=0.0002, flops_s=50e9, bytes_s=8e9, per_prefill=0.006)


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
            + TRUE["per_prefill"] * sum(1 for _, c, _ in shapes if c == 0)
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
    assert fit.per_prefill_s == pytest.approx(TRUE["per_prefill"], rel=1e-6)
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


# ---- the fit's physics: attention rate, roofline (max) model, disturbed steps ----------------

ATTN_RATE = 5e9


def _shapes(rng: random.Random) -> list[tuple[int, int, int]]:
    shapes = [(1, rng.randint(10, 1500), 1) for _ in range(rng.randint(0, 48))]
    if not shapes or rng.random() < 0.4:
        shapes.append((rng.randint(8, 512), rng.choice([0, 0, 512]), 1))
    return shapes


def _roofline_trace(overlap: bool, n: int = 300, attn_rate: float = ATTN_RATE):
    """Step times of a known machine whose attention runs at its own rate, per operator the
    sum or the max of compute and memory time."""
    rng = random.Random(2)
    records = []
    for _ in range(n):
        shapes = _shapes(rng)
        t = TRUE["per_step"] + TRUE["per_req"] * len(shapes)
        for op in step_cost(ARCH, shapes, FP32).ops:
            times = ARCH.num_hidden_layers if op.per_layer else 1
            rate = attn_rate if op.kind == "attention" else TRUE["flops_s"]
            compute, memory = op.flops / rate, op.total_bytes / TRUE["bytes_s"]
            t += (max(compute, memory) if overlap else compute + memory) * times
        prefill = sum(s[0] for s in shapes if s[1] == 0 or s[0] > 1)
        records.append(
            StepRecord(prefill, sum(s[0] for s in shapes) - prefill, len(shapes),
                       sum(a + b for a, b, _ in shapes), t, shapes=tuple(shapes))
        )  # fmt: skip
    return records


@pytest.mark.parametrize("overlap", [False, True])
def test_fit_recovers_attention_rate_and_the_combine_rule(overlap):
    fit = fit_trace(_roofline_trace(overlap), ARCH, FP32, overlap=overlap)
    assert fit.overlap is overlap
    assert fit.rel_rms_error < 1e-6
    assert fit.attention_flops_per_s == pytest.approx(ATTN_RATE, rel=1e-4)
    assert fit.flops_per_s == pytest.approx(TRUE["flops_s"], rel=1e-4)
    assert fit.per_request_s == pytest.approx(TRUE["per_req"], rel=1e-4)


def test_disturbed_steps_are_dropped_and_do_not_bend_the_fit():
    records = _roofline_trace(False)
    disturbed = set(range(0, len(records), 20))  # 5% of the steps ran 3x slower
    noisy = [
        StepRecord(**{**r.__dict__, "wall_time_s": r.wall_time_s * (3 if i in disturbed else 1)})
        for i, r in enumerate(records)
    ]
    fit = fit_trace(noisy, ARCH, FP32)
    assert fit.num_outliers == len(disturbed)
    assert fit.flops_per_s == pytest.approx(TRUE["flops_s"], rel=1e-4)
    assert fit.bytes_per_s == pytest.approx(TRUE["bytes_s"], rel=1e-4)


@pytest.mark.parametrize("overlap", [False, True])
def test_the_planner_predicts_what_the_fit_predicts(overlap, tmp_path, monkeypatch):
    """The written profile, loaded from the catalogue and timed by the planner's own step-time
    model, gives the fit's step times (attention unit, combine rule and overheads included)."""
    records = _roofline_trace(overlap, n=60)
    fit = fit_trace(records, ARCH, FP32, overlap=overlap)
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    write_calibration(profile_dict(fit, "synthetic", FP32))
    hw = get_hardware("this-machine")
    assert hw.profile.overlap_compute_memory is overlap and hw.profile.attention_unit is not None
    model = LayoutStepTime(ARCH, hw, FP32, place(ARCH, hw, FP32, 0, chips=1))
    predicted = fit.predict(StepFeatures.of(records, ARCH, FP32))
    for rec, t in zip(records, predicted, strict=True):
        assert model.seconds(rec.batch_shape()) == pytest.approx(t, rel=1e-9)
        assert model.seconds(rec.batch_shape()) == pytest.approx(rec.wall_time_s, rel=1e-5)


def test_fit_calibration_holds_out_and_picks_the_better_model():
    records = _roofline_trace(True, n=120)
    held = [i % 4 == 0 for i in range(len(records))]
    trace = CalibrationTrace(records, ["g"] * len(records), held, ARCH)
    report = fit_calibration(trace, FP32)
    assert set(report.candidates) == {"sum", "max"}
    assert report.fit.overlap is True  # the truth is a roofline
    assert report.holdout_errors["all"].num_steps == sum(held)
    assert report.holdout_errors["all"].rms < 1e-5
    assert report.candidates["sum"] > 10 * report.candidates["max"]
    with pytest.raises(ConfigError, match="holds out no undisturbed steps"):
        fit_calibration(CalibrationTrace(records, ["g"] * 120, [False] * 120, ARCH), FP32)


def test_default_scenarios_cover_serving_shapes_and_hold_some_out():
    scenarios = CalibrationSettings().scenarios()
    names = [s.name for s in scenarios]
    assert "prefill 1024" in names and "decode 64x32" in names and "mixed 32+480" in names
    assert any(s.late_prompt_len for s in scenarios if s.holdout)
    assert {s.holdout for s in scenarios} == {True, False}
    settings = CalibrationSettings(dtype="bfloat16").engine_settings()
    assert settings["dtype"] == "bfloat16" and settings["enable_prefix_caching"] is False


@pytest.mark.parametrize("served", [False, True], ids=["in-process", "served"])
def test_real_engine_calibration_predicts_a_held_out_step(tmp_path, served):
    """A short trace of the bundled model, run in this process or sent to a real `tokenmill
    serve` as streamed requests: every shape is timed, each step lands in its own scenario, and
    the fit predicts a step it did not see within a loose bound (this machine may be shared, so
    only the order of magnitude is asserted)."""
    from tokenmill.plan.calibration.scenarios import record_calibration_trace

    settings = CalibrationSettings(
        dtype="float32", kv_cache_memory_gib=0.05, prefill_lens=(16, 64), batch_sizes=(1, 3),
        long_prompt_len=48, long_batch_sizes=(2,), decode_steps=5, mixed=((2, 24),),
        holdout=(Scenario("held out", 2, 16, 3, holdout=True),),
        warmup=Scenario("warm-up", 2, 8, 2), max_attempts=1, served=served,
    )  # fmt: skip
    trace = record_calibration_trace(settings, work_dir=tmp_path)
    assert len(trace.records) == len(trace.groups) == len(trace.holdout) >= 15
    assert {"prefill", "decode", "mixed"} <= {r.kind for r in trace.records}

    # Each step is attributed to the scenario that ran it (served requests arrive one by one,
    # so a scenario's steps may mix prompts and decodes; its token totals are exact).
    def tokens(group: str) -> tuple[int, int]:
        steps = [r for r, g in zip(trace.records, trace.groups, strict=True) if g == group]
        return sum(r.num_prefill_tokens for r in steps), sum(r.num_decode_tokens for r in steps)

    assert tokens("decode 3x32") == (3 * 32, 3 * 4)  # 5 tokens each: 1 from the prompt step
    prompt_tokens, decode_tokens = tokens("mixed 2+24")
    assert decode_tokens == 2 * 4 and prompt_tokens > 2 * 32 and (prompt_tokens - 64) % 24 == 0
    assert trace.groups.count("prefill 64") == 2 and trace.holdout.count(True) >= 3
    clean_held = [h and not d for h, d in zip(trace.holdout, trace.disturbed, strict=True)]
    if not any(clean_held):
        pytest.skip("other processes took the CPUs during every held-out step")
    report = fit_calibration(trace, FP32)
    held = report.holdout_errors["all"]
    # Every clean held-out step is scored (under load a disturbed one is left out).
    assert held.num_steps == sum(clean_held) and held.median_abs < 4.0
    path = tmp_path / "trace.jsonl"
    write_trace(path, trace.records)
    assert len(path.read_text().splitlines()) == len(trace.records)


def test_calibration_section_is_written_beside_the_profile(tmp_path):
    fit = fit_trace(_synthetic_trace(0.0, True, n=20), ARCH, FP32)
    path = write_calibration(
        profile_dict(fit, "x", FP32, {"engine": {"dtype": "float32"}}), tmp_path / "p.json"
    )
    assert read_calibration(path) == {"engine": {"dtype": "float32"}}
    assert read_calibration(tmp_path / "missing.json") is None


def test_steps_other_processes_disturbed_are_left_out():
    records = _roofline_trace(False, n=120)
    others = [0.0] * len(records)
    slowed = []
    for i in range(0, len(records), 3):  # a third of the steps: a neighbour took half a core
        others[i] = 0.5 * records[i].wall_time_s * 10
        slowed.append(i)
        records[i] = StepRecord(
            **{**records[i].__dict__, "wall_time_s": records[i].wall_time_s * 10}
        )
    held = [i % 4 == 1 for i in range(len(records))]
    trace = CalibrationTrace(records, ["g"] * len(records), held, ARCH, others_cpu_s=others)
    assert [i for i, d in enumerate(trace.disturbed) if d] == slowed
    report = fit_calibration(trace, FP32, combine="sum")
    assert report.num_disturbed == len(slowed)
    assert report.fit.flops_per_s == pytest.approx(TRUE["flops_s"], rel=1e-4)
    assert report.holdout_errors["all"].rms < 1e-5
