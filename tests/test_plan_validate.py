"""`tokenmill plan validate`: the same workload and engine settings on both sides, the table and
its verdicts, and one measured run against a real `tokenmill serve` subprocess."""

import argparse
import json
import math
from dataclasses import replace

import pytest

from tokenmill.bench.serve_process import parse_engine_counters
from tokenmill.cli.main import main
from tokenmill.errors import ConfigError
from tokenmill.perf import Precision, StepRecord, step_cost
from tokenmill.perf.kv_memory import num_kv_blocks
from tokenmill.perf.trace import read_trace
from tokenmill.plan.calibration.fit import fit_trace
from tokenmill.plan.calibration.profile import profile_dict, write_calibration
from tokenmill.plan.models import get_model
from tokenmill.plan.validation.predict_measure import (
    ValidationSettings,
    build_validation_workload,
    measure,
    predict,
)
from tokenmill.plan.validation.probe import _served_steps, speed_probe
from tokenmill.plan.validation.report import format_markdown, validation_command
from tokenmill.plan.validation.results import (
    RunMetrics,
    ValidationReport,
    ValidationRow,
    summarize_runs,
)
from tokenmill.plan.validation.run import check_calibration

ARCH = get_model("smollm2-135m").arch
FP32 = Precision(weights="fp32")


@pytest.fixture()
def calibrated(tmp_path, monkeypatch):
    return write_synthetic_calibration(tmp_path, monkeypatch)


def write_synthetic_calibration(tmp_path, monkeypatch):
    """A this-machine profile fitted to a synthetic CPU (4 ms per step, 50 GFLOP/s, 8 GB/s),
    in a TOKENMILL_HOME of its own (this process only: servers started later would rebuild
    the native kernels there)."""
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    records = []
    for b in (1, 2, 4, 8, 16, 32, 64):
        for shapes in ([(1, 100 * b, 1)] * b, [(1, 20, 1)] * b + [(256, 0, 1)]):
            cost = step_cost(ARCH, shapes, FP32)
            t = 0.004 + 2e-4 * len(shapes) + cost.flops / 50e9 + cost.total_bytes / 8e9
            records.append(StepRecord(0, 0, len(shapes), 0, t, shapes=tuple(shapes)))
    fit = fit_trace(records, ARCH, FP32)
    write_calibration(profile_dict(fit, "synthetic", FP32, {"engine": {"dtype": "float32"}}))
    return fit


TINY = dict(
    model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256,
)  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_blocks_match_what_the_engine_allocates(dtype):
    from tokenmill import LLM

    engine = LLM(
        load_format="dummy", dummy_config=TINY, dtype=dtype, kv_cache_memory_gib=0.01
    ).engine
    assert num_kv_blocks(engine.arch, 16, dtype, 0.01) == engine.stats().num_kv_blocks


@pytest.mark.parametrize("rate", [0.5, math.inf])
def test_workload_is_the_one_bench_serve_sends(rate):
    from tokenmill.bench.serve import open_model_info
    from tokenmill.cli.bench_serve import build_workload_from_args
    from tokenmill.workload import ArrivalSpec

    settings = ValidationSettings(num_prompts=12, seed=3, rates=(rate,))
    tokenizer = open_model_info(None).tokenizer
    ours = build_validation_workload(settings, rate, tokenizer)
    args = argparse.Namespace(workload="sharegpt", num_prompts=12, seed=3, tokenizer=None)
    theirs = build_workload_from_args(args, ArrivalSpec(rate, 1.0, None))
    assert ours.requests == theirs.requests


def test_serve_arguments_carry_every_engine_setting():
    args = ValidationSettings(
        dtype="bfloat16", max_num_seqs=32, max_num_batched_tokens=256, block_size=8,
        kv_cache_memory_gib=0.5,
    ).serve_args()  # fmt: skip
    text = " ".join(args)
    for expected in ("--dtype bfloat16", "--max-num-seqs 32", "--max-num-batched-tokens 256",
                     "--block-size 8", "--kv-cache-memory 0.5", "--no-prefix-caching"):  # fmt: skip
        assert expected in text


def test_prediction_runs_the_real_scheduler_on_the_calibrated_profile(calibrated):
    settings = ValidationSettings(workload="fixed:in=200,out=40", num_prompts=16)
    at_once = predict(build_validation_workload(settings, math.inf, None), ARCH, settings)
    slow = predict(build_validation_workload(settings, 0.02, None), ARCH, settings)
    assert at_once.num_requests == slow.num_requests == 16
    assert at_once.output_tokens == 16 * 40
    # All at once: the batch shares every step, so requests wait longer and decode slower...
    assert at_once.ttft_p99_ms > slow.ttft_p99_ms and at_once.tpot_median_ms > slow.tpot_median_ms
    # ...but the machine is busy for less time per token.
    assert at_once.output_tok_s > slow.output_tok_s
    # A lone request decodes one token per step: TPOT is about the one-request step time.
    one = step_cost(ARCH, [(1, 220, 1)], FP32)
    alone = 0.004 + 2e-4 + one.flops / 50e9 + one.total_bytes / 8e9
    assert slow.tpot_median_ms == pytest.approx(alone * 1e3, rel=0.05)


def test_errors_verdicts_and_table():
    pred = RunMetrics(105.0, 40.0, 2000.0, 500.0, 9000.0, 60.0, 64, 2400)
    meas = RunMetrics(100.0, 50.0, 1500.0, 400.0, 8000.0, 48.0, 64, 2400, 900, 45.0, 0.01)
    row = ValidationRow(0.5, pred, meas, (0.4, 0.5, 0.6), (0.8, 0.5, 0.6))
    errs = row.errors()
    assert errs["tpot_median_ms"] == pytest.approx(0.05)
    assert errs["output_tok_s"] == pytest.approx(-0.2)
    assert errs["ttft_p99_ms"] == pytest.approx(1 / 3)
    assert row.passes() == {"tpot_median_ms": True, "output_tok_s": False, "ttft_p99_ms": False}
    report = ValidationReport(ValidationSettings(), [row], {"fit": {"num_steps": 10}})
    table = format_markdown(report)
    assert "| 0.5 req/s | 105 | 100 | +5% ok | 40.0 | 50.0 | -20% MISS |" in table
    assert "| 1% | 0.40 |" in table and "Taken on a shared machine" not in table
    meas.others_cpu_share = 0.3
    table = format_markdown(report)
    assert "| 30% DISTURBED |" in table
    assert "other processes used up to 30% of a core during 1 of 1 runs" in table
    data = report.as_dict()
    assert data["rows"][0]["passes"]["tpot_median_ms"] is True
    assert data["settings"]["rates"] == [0.5, 1.0, 2.0, "inf"]
    json.dumps(data)


def test_repeated_runs_summarize_to_medians_and_ranges():
    def metrics(tpot: float, tok_s: float) -> RunMetrics:
        return RunMetrics(tpot, tok_s, 1000.0, 400.0, 8000.0, 48.0, 64, 2400, 901, 45.0, 0.01)

    prediction = metrics(50.0, 100.0)
    runs = [
        ValidationRow(1.0, metrics(50.0 + i, 100.0), metrics(tpot, 90.0 + i), (0.5,), (0.6,),
                      speed=(probe, 1.0), unscaled=prediction, repeat=i)
        for i, (tpot, probe) in enumerate([(60.0, 1.2), (48.0, 0.9), (52.0, 1.0)])
    ]  # fmt: skip
    runs[1].measured.num_steps = 900
    summary = summarize_runs(ValidationRow(1.0, prediction, None), runs)
    assert summary.repeat == 3 and summary.speed == (1.0, 1.0)
    assert summary.predicted.tpot_median_ms == 51.0 and summary.measured.tpot_median_ms == 52.0
    assert summary.spread["tpot_median_ms"] == (48.0, 60.0)
    assert summary.measured.output_tok_s == 91.0 and summary.measured.num_steps == 901
    settings = ValidationSettings(rates=(1.0,), repeats=3)
    report = ValidationReport(settings, [summary], {"fit": {"num_steps": 10}}, runs=runs)
    table = format_markdown(report)
    assert "Medians of 3 runs per rate" in table
    assert "| 1 req/s | 51.0 | 52.0 (48.0-60.0) | -2% ok |" in table
    assert "| 1 req/s #2 | 51.0 | 48.0 | +6% ok |" in table  # each run against its own probe
    data = report.as_dict()
    assert len(data["runs"]) == 3 and data["rows"][0]["repeat"] == 3
    json.dumps(data)


def test_cpu_taken_by_other_processes_is_seen():
    import subprocess
    import sys

    from tokenmill.bench.machine_load import cpu_seconds, others_cpu_since

    before = cpu_seconds()
    busy = (
        "import sys, time\nt = time.process_time()\n"
        "while time.process_time() - t < 0.5: pass\nprint('done', flush=True)\nsys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", busy], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "done"
    # Still running, not waited for: its CPU time is another process's, not ours.
    assert others_cpu_since(before) >= 0.3
    proc.communicate("")


def test_metrics_counters_are_parsed():
    text = (
        "# TYPE tokenmill:engine_steps_total counter\n"
        'tokenmill:engine_steps_total{model_name="m"} 123.0\n'
        'tokenmill:engine_step_seconds_total{model_name="m"} 4.5\n'
        'tokenmill:engine_prompt_step_seconds_total{model_name="m"} 1.25\n'
        'tokenmill:engine_loop_seconds_total{model_name="m"} 4.75\n'
    )
    assert parse_engine_counters(text) == (123.0, 4.5, 1.25, 4.75)
    assert all(math.isnan(x) for x in parse_engine_counters(""))


def test_an_uncalibrated_or_mismatched_machine_is_refused(tmp_path, monkeypatch, calibrated):
    with pytest.raises(ConfigError, match="calibrated with --dtype float32, not bfloat16"):
        check_calibration(ValidationSettings(dtype="bfloat16"))
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="not calibrated"):
        check_calibration(ValidationSettings())


def test_cli_predict_only_writes_the_table(calibrated, tmp_path, capsys):
    md, js = tmp_path / "v.md", tmp_path / "v.json"
    code = main([
        "plan", "validate", "--predict-only", "--workload", "fixed:in=100,out=20",
        "--num-prompts", "8", "--rates", "1,inf", "--out-md", str(md), "--out-json", str(js),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "| all at once |" in out and "| 1 req/s |" in out
    assert "tokenmill plan validate --calibrate" in md.read_text()
    rows = json.loads(js.read_text())["rows"]
    assert [r["rate"] for r in rows] == [1.0, "inf"] and rows[0]["measured"] is None


def test_regenerating_command_holds_every_setting():
    cmd = validation_command(ValidationSettings(num_prompts=96, rates=(0.3, math.inf)))
    assert "--num-prompts 96" in cmd and "--rates 0.3,inf" in cmd and "--dtype float32" in cmd
    assert "--repeats" not in cmd and "--served" not in cmd
    cmd = validation_command(ValidationSettings(repeats=3), served_calibration=True)
    assert cmd.endswith("--repeats 3 --served")


@pytest.mark.parametrize(
    "bad",
    [
        ["--rates", "0"],
        ["--rates", "fast"],
        ["--num-prompts", "0"],
        ["--speed-probe-prompts", "-1"],
        ["--repeats", "0"],
    ],
)
def test_bad_validate_arguments_are_refused(bad, capsys, calibrated):
    try:
        code = main(["plan", "validate", "--predict-only", "--out-md", "none",
                     "--out-json", "none", *bad])  # fmt: skip
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    assert code == 2


def test_existing_plan_interface_still_works(capsys):
    code = main(["plan", "--model", "smollm2-135m", "--hardware", "h100", "--workload",
                 "fixed:in=100,out=10", "--concurrency", "2", "--num-prompts", "4", "--json"])  # fmt: skip
    assert code == 0 and "ttft_s" in json.loads(capsys.readouterr().out)


def test_speed_scales_decode_and_prompt_steps_apart(calibrated):
    settings = ValidationSettings(workload="fixed:in=200,out=40", num_prompts=8)
    workload = build_validation_workload(settings, math.inf, None)
    base = predict(workload, ARCH, settings)
    slow = predict(workload, ARCH, settings, speed=(1.5, 1.0))
    decode = base.busy_s - base.prompt_busy_s
    assert 0 < base.prompt_busy_s < base.busy_s  # the prompts take the first few steps
    assert slow.busy_s - slow.prompt_busy_s == pytest.approx(1.5 * decode)
    assert slow.prompt_busy_s == pytest.approx(base.prompt_busy_s)
    assert slow.ttft_p99_ms == pytest.approx(base.ttft_p99_ms)  # prompts done before decoding
    # Decoding requests also wait through the mixed steps that finish the other prompts.
    assert base.tpot_median_ms < slow.tpot_median_ms < 1.5 * base.tpot_median_ms
    assert slow.num_steps == base.num_steps  # all at once: the same steps, decodes slower
    both = predict(workload, ARCH, settings, speed=(1.5, 1.5))
    assert both.busy_s == pytest.approx(1.5 * base.busy_s)
    assert both.ttft_p99_ms == pytest.approx(1.5 * base.ttft_p99_ms)


def test_speed_probe_factor_reproduces_the_measured_engine_time(calibrated, monkeypatch):
    from types import SimpleNamespace

    from tokenmill.plan.validation import probe as probe_module

    settings = ValidationSettings(workload="fixed:in=100,out=30", speed_probe_prompts=4)
    probe = replace(settings, num_prompts=4, seed=1000, num_warmup=0)
    base = predict(build_validation_workload(probe, math.inf, None), ARCH, probe)
    decode = base.busy_s - base.prompt_busy_s

    def measured(decode_s, prompt_s):
        return lambda *a: RunMetrics(
            1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 4, 120, busy_s=decode_s + prompt_s, prompt_busy_s=prompt_s
        )

    info = SimpleNamespace(arch=ARCH, tokenizer=None)  # what open_model_info gives
    monkeypatch.setattr(probe_module, "measure", measured(1.3 * decode, 0.9 * base.prompt_busy_s))
    assert speed_probe(None, settings, info, None) == pytest.approx((1.3, 0.9, 0.0, 0.0))
    # With the engine loop's time on record, the decode steps carry the work around each step.
    looped = measured(1.3 * decode, 0.9 * base.prompt_busy_s)()
    looped.loop_s = 1.4 * decode + looped.prompt_busy_s
    monkeypatch.setattr(probe_module, "measure", lambda *a: looped)
    assert speed_probe(None, settings, info, None) == pytest.approx((1.4, 0.9, 0.0, 0.0))
    monkeypatch.setattr(probe_module, "measure", measured(decode, 0.0))
    with pytest.raises(ConfigError, match="ran no prompt steps"):
        speed_probe(None, settings, info, None)


def test_probed_rows_show_the_factor_and_the_unprobed_error():
    unscaled = RunMetrics(90.0, 40.0, 2000.0, 500.0, 9000.0, 60.0, 64, 2400)
    pred = RunMetrics(99.0, 40.0, 2000.0, 500.0, 9000.0, 60.0, 64, 2400)
    meas = RunMetrics(100.0, 40.0, 2000.0, 500.0, 9000.0, 60.0, 64, 2400, 900, 45.0, 0.01)
    row = ValidationRow(1.0, pred, meas, speed=(1.1, 0.95), unscaled=unscaled)
    assert row.errors()["tpot_median_ms"] == pytest.approx(-0.01)
    assert row.errors(unscaled)["tpot_median_ms"] == pytest.approx(-0.1)
    table = format_markdown(ValidationReport(ValidationSettings(), [row], {}))
    assert "| -1% ok |" in table and "| x1.10 / x0.95 | -10% |" in table
    assert ValidationReport(ValidationSettings(), [row]).as_dict()["rows"][0]["speed"] == (
        1.1,
        0.95,
    )


def test_measure_loads_a_real_server_and_reads_its_engine_counters(tmp_path, monkeypatch):
    from tokenmill.bench.serve import open_model_info
    from tokenmill.bench.serve_process import ServeProcess

    settings = ValidationSettings(
        workload="fixed:in=24,out=6", num_prompts=3, num_warmup=0, kv_cache_memory_gib=0.25
    )
    trace = tmp_path / "steps.jsonl"
    args = [*settings.serve_args(), "--step-trace", str(trace)]
    with ServeProcess(args, tmp_path / "serve.log") as server:
        got = measure(server, settings, math.inf, tmp_path / "run.json")
        # The server appends its steps to the trace as it goes idle: readable while it runs.
        live = _served_steps(trace, got.first_step, got.num_steps)
        assert live is not None and len(live) == got.num_steps
        # A probe against the profile of another machine (50 GFLOP/s, 8 GB/s): two other
        # requests; the ratios measured / predicted are positive and finite (how far below 1
        # depends on the load of this shared machine: no timing threshold here).
        write_synthetic_calibration(tmp_path / "home", monkeypatch)
        probe = replace(settings, speed_probe_prompts=2)
        decode, prompt, per_request, per_step = speed_probe(
            server, probe, open_model_info(None), tmp_path / "probe.json", trace
        )
    assert 0 < decode < math.inf and 0 < prompt < math.inf
    # Two 6-token requests give too few steps to fit a cost per request: none is added.
    assert per_request == per_step == 0.0
    assert got.num_requests == 3 and got.output_tokens == 18
    assert json.loads((tmp_path / "probe.json").read_text())["metrics"]["num_completed"] == 2
    # The server wrote every step it took when it stopped: the counters index into it.
    records = read_trace(trace)
    assert got.first_step == 0 and got.num_steps < len(records)  # the probe's steps follow
    run = records[: got.num_steps]
    assert sum(r.num_decode_tokens + r.num_prefill_tokens for r in run) == 3 * (24 + 5)
    # The engine's own counters: at least one prefill step and five decode steps ran, and
    # they took time, though no more than the whole run.
    assert got.num_steps >= 6
    assert 0 < got.busy_s <= got.duration_s + 0.5
    assert 0 < got.prompt_busy_s < got.busy_s  # the one prompt step, then five decode steps
    assert got.busy_s < got.loop_s <= got.duration_s + 0.5  # the loop: steps and their outputs
    assert got.tpot_median_ms > 0 and got.output_tok_s > 0


def test_served_steps_are_scored_by_the_calibrated_fit(calibrated):
    from dataclasses import asdict, replace

    from tokenmill.plan.validation.served_steps import format_served_steps, served_step_errors

    records = []
    for b in (1, 3, 9, 27):
        shapes = [(1, 50 * b, 1)] * b
        cost = step_cost(ARCH, shapes, FP32)
        t = 0.004 + 2e-4 * b + cost.flops / 50e9 + cost.total_bytes / 8e9
        records.append(StepRecord(0, b, b, 0, t, shapes=tuple(shapes)))
    calibration = {"fit": asdict(calibrated)}
    exact = served_step_errors(records, 1, 2, calibration, ARCH, FP32)
    assert exact["all"]["num_steps"] == exact["decode"]["num_steps"] == 2
    assert abs(exact["all"]["mean"]) < 0.01  # the synthetic machine is the fitted one
    slower = [replace(r, wall_time_s=r.wall_time_s * 1.25) for r in records]
    biased = served_step_errors(slower, 0, 4, calibration, ARCH, FP32)
    assert biased["decode"]["mean"] == pytest.approx(1 / 1.25 - 1, abs=0.01)
    text = "\n".join(format_served_steps([("1 req/s", biased), ("2 req/s", {})]))
    assert "| 1 req/s | -20.0% / 20.0% (4) | -20.0% / 20.0% (4) | - | - |" in text
    assert "2 req/s" not in text


def test_serving_cost_per_request_is_fitted_from_served_steps(calibrated):
    """Served steps that take 0.9x the calibrated time plus 0.4 ms per request give back those
    two numbers; steps with prompt tokens are left out; one batch size cannot separate them."""
    from dataclasses import asdict, replace

    from tokenmill.plan.validation.served_steps import fit_serving_cost

    calibration = {"fit": asdict(calibrated)}
    feats_of = [(1, 3, 9, 27, 40)[i % 5] for i in range(20)]
    records = []
    for b in feats_of:
        shapes = [(1, 50 * b, 1)] * b
        cost = step_cost(ARCH, shapes, FP32)
        model = 0.004 + 2e-4 * b + cost.flops / 50e9 + cost.total_bytes / 8e9
        records.append(StepRecord(0, b, b, 0, 0.9 * model + 4e-4 * b, shapes=tuple(shapes)))
    prompt = StepRecord(64, 1, 2, 0, 5.0, shapes=((64, 0, 1), (1, 30, 1)))
    a, c = fit_serving_cost([[*records, prompt]], calibration, ARCH, FP32)
    assert a == pytest.approx(0.9, rel=0.02) and c == pytest.approx(4e-4, rel=0.05)
    # Large batches relatively faster than calibrated: no negative cost, one factor instead.
    cheaper = [replace(r, wall_time_s=r.wall_time_s * 1.2 - 8e-4 * r.num_reqs) for r in records]
    a, c = fit_serving_cost([cheaper], calibration, ARCH, FP32)
    assert c == 0 and 0.9 < a < 1.2
    one_batch = [r for r in records if r.num_reqs == 3] * 3
    assert fit_serving_cost([one_batch], calibration, ARCH, FP32) is None
    # Earlier probes price the cost per request when the last one alone cannot (one batch
    # size), each probe with its own speed: the last probe's speed and the shared cost.
    slow = [  # 1.2 x the calibrated time, the same cost per request
        replace(r, wall_time_s=(r.wall_time_s - 4e-4 * 3) / 0.9 * 1.2 + 4e-4 * 3) for r in one_batch
    ]
    a, c = fit_serving_cost([records, slow], calibration, ARCH, FP32)
    assert a == pytest.approx(1.2, rel=0.02) and c == pytest.approx(4e-4, rel=0.05)
