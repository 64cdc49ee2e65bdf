"""The validation table: markdown and JSON of predicted vs measured serving runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from tokenmill.bench.machine_load import DISTURBED_SHARE
from tokenmill.plan.validation.served_steps import format_served_steps

if TYPE_CHECKING:
    from tokenmill.plan.validation.predict_measure import ValidationSettings
    from tokenmill.plan.validation.results import ValidationReport, ValidationRow

# (metric, what it is, tolerance): the targets.
TARGETS = (
    ("tpot_median_ms", "median TPOT", 0.10),
    ("output_tok_s", "output throughput", 0.10),
    ("ttft_p99_ms", "p99 TTFT", 0.25),
)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.1f}{unit}" if value < 100 else f"{value:,.0f}{unit}"


def _arrivals(rate: float) -> str:
    return "all at once" if math.isinf(rate) else f"{rate:g} req/s"


def format_row(row: ValidationRow, label: str = "") -> str:
    """One table row; a summary of several runs shows each measurement's range."""
    errs, ok = row.errors(), row.passes()
    cells = [_arrivals(row.rate) + label]
    for key, _, _ in TARGETS:
        pred = getattr(row.predicted, key)
        meas = _fmt(getattr(row.measured, key) if row.measured else None)
        if key in row.spread and row.repeat > 1:
            lo, hi = row.spread[key]
            meas += f" ({_fmt(lo)}-{_fmt(hi)})"
        err = f"{errs[key]:+.0%} {'ok' if ok[key] else 'MISS'}" if key in errs else "-"
        cells += [_fmt(pred), meas, err]
    m = row.measured
    busy = (
        f"{_fmt(row.predicted.busy_s)} / {_fmt(m.busy_s)} s ({_fmt(m.duration_s)} s)" if m else "-"
    )
    others = m.others_cpu_share if m else None
    load = f"{row.loadavg_before[0]:.2f}" if row.loadavg_before else "-"
    probe = _probe_cell(row.speed)
    unscaled = row.errors(row.unscaled).get("tpot_median_ms") if row.unscaled else None
    unscaled_cell = f"{unscaled:+.0%}" if unscaled is not None else "-"
    return "| " + " | ".join([*cells, probe, unscaled_cell, busy, _fmt_share(others), load]) + " |"


def _probe_cell(speed: tuple[float, ...] | None) -> str:
    if not speed:
        return "-"
    decode = f"x{speed[0]:.2f}"
    if len(speed) > 2:
        decode += f" +{speed[2] * 1e3:.2f} ms/req"
    return f"{decode} / x{speed[1]:.2f}"


def _fmt_share(share: float | None) -> str:
    if share is None:
        return "-"
    return f"{share:.0%}" + (" DISTURBED" if share > DISTURBED_SHARE else "")


_HEAD = (
    "| arrivals | TPOT p50 pred ms | meas ms | err | out tok/s pred | meas | err "
    "| TTFT p99 pred ms | meas ms | err | speed probe decode / prompt | TPOT err unprobed "
    "| engine busy pred / meas (run) | others' CPU | load before |"
)
_RULE = "|" + "---|" * 15


def format_markdown(report: ValidationReport) -> str:
    runs = max((r.repeat for r in report.rows), default=1)
    each = (
        [f"Each run, in the order measured ({runs} per rate, in turn over the rates):", "",
         _HEAD, _RULE, *(format_row(r, f" #{r.repeat + 1}") for r in report.runs), ""]
        if runs > 1 else []
    )  # fmt: skip
    medians = (
        [f"Medians of {runs} runs per rate; in brackets the lowest and highest measured.", ""]
        if runs > 1
        else []
    )
    served = [
        (_arrivals(r.rate) + (f" #{r.repeat + 1}" if runs > 1 else ""), r.served_steps)
        for r in (report.runs if runs > 1 else report.rows)
    ]
    lines = [
        *_setup_lines(report), "", *medians, _HEAD, _RULE,
        *(format_row(row) for row in report.rows), "", *each, *format_served_steps(served),
        *_load_warning(report), _footnote(report.settings),
    ]  # fmt: skip
    return "\n".join(lines)


def _setup_lines(report: ValidationReport) -> list[str]:
    """The workload, engine, calibration and machine the table was measured with."""
    s, cal, machine = report.settings, report.calibration or {}, report.machine
    holdout = cal.get("holdout_errors", {}).get("all", {})
    return [
        f"Workload: {s.workload}, {s.num_prompts} requests per run, seed {s.seed}, "
        f"burstiness {s.burstiness:g}; engine: {s.dtype}, max_num_seqs {s.max_num_seqs}, "
        f"max_num_batched_tokens {s.max_num_batched_tokens}, block size {s.block_size}, "
        f"KV {s.kv_cache_memory_gib:g} GiB, prefix caching off.",
        f"Calibration ({'served' if cal.get('served') else 'in-process'}): "
        f"{cal.get('fit', {}).get('num_steps', '?')} steps, held-out step-time error "
        f"median {holdout.get('median_abs', float('nan')):.1%}, RMS "
        f"{holdout.get('rms', float('nan')):.1%}; {cal.get('num_disturbed_steps', '?')} steps "
        f"left out as disturbed, 1-min load average before {cal.get('loadavg_before', ['?'])[0]}.",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cpu_count', '?')} CPUs, "
        f"torch {machine.get('torch', '?')} with {machine.get('torch_threads', '?')}"
        f" threads; {machine.get('time', '')}.",
    ]


def _footnote(s: ValidationSettings) -> str:
    return (
        "err = (predicted - measured) / measured; targets: median TPOT and output throughput "
        "within 10%, p99 TTFT within 25%. Speed probe: this machine's speed drifts by 10-20% "
        "from minute to minute, so just before each run a short burst of requests "
        f"({s.speed_probe_prompts} of the workload's requests, other prompts, all at once) "
        "goes to the same server, and its measured over predicted time of the steps without "
        "and with prompt tokens scales those two kinds of steps in the run's prediction "
        "(x1.10: they run 10% slower now than when calibrated); for the steps without prompt "
        "tokens, a factor and a cost per request in the step are fitted to the probe's served "
        "steps instead (x0.93 +0.43 ms/req: streaming each token costs CPU the engine's "
        "threads would use), plus the engine loop's time around each step; TPOT err unprobed "
        "is the prediction's error without that scaling. Engine busy: summed step time, "
        "predicted vs the server's own counter; (run) is the measured run's duration. Others' "
        "CPU: the share of a core other processes (neither the server nor the client) used "
        f"during the run; above {DISTURBED_SHARE:.0%} the run measured a shared machine, not "
        "this one."
    )


def _load_warning(report: ValidationReport) -> list[str]:
    cal = report.calibration or {}
    num_steps = cal.get("fit", {}).get("num_steps", 0) + cal.get("num_disturbed_steps", 0)
    cal_share = cal.get("num_disturbed_steps", 0) / max(num_steps, 1)
    shares = [r.measured.others_cpu_share or 0.0 for r in report.runs or report.rows if r.measured]
    disturbed = [s for s in shares if s > DISTURBED_SHARE]
    if not disturbed and cal_share <= 0.1:
        return []
    return [
        f"**Taken on a shared machine**: other processes used up to {max(shares, default=0):.0%}"
        f" of a core during {len(disturbed)} of {len(shares)} runs, and {cal_share:.0%} of the "
        "calibration's steps were disturbed; with 2 cores and torch's threads spin-waiting, "
        "that slows steps several times. These numbers do not measure this machine alone: "
        "rerun on a quiet machine.",
        "",
    ]


def write_report(report: ValidationReport, md_path: Path | None, json_path: Path | None) -> None:
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        title = "# Planner validation: predicted vs measured serving on this machine\n\n"
        served = bool((report.calibration or {}).get("served"))
        cmd = f"Regenerate: `{validation_command(report.settings, served)}`\n\n"
        md_path.write_text(title + cmd + format_markdown(report) + "\n", encoding="utf-8")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")


def validation_command(s: ValidationSettings, served_calibration: bool = False) -> str:
    rates = ",".join("inf" if math.isinf(r) else f"{r:g}" for r in s.rates)
    model = f" --model {s.model}" if s.model else ""
    return (
        f"tokenmill plan validate --calibrate{model} --dtype {s.dtype} --workload {s.workload} "
        f"--num-prompts {s.num_prompts} --rates {rates} --seed {s.seed} "
        f"--max-num-seqs {s.max_num_seqs} --max-num-batched-tokens {s.max_num_batched_tokens} "
        f"--block-size {s.block_size} --kv-cache-memory {s.kv_cache_memory_gib:g} "
        f"--speed-probe-prompts {s.speed_probe_prompts}"
        + (f" --repeats {s.repeats}" if s.repeats > 1 else "")
        + (" --served" if served_calibration else "")
    )
