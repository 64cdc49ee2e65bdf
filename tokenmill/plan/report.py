"""A plan as a readable table or a JSON object."""

from __future__ import annotations

import textwrap
from dataclasses import asdict
from typing import Any

from tokenmill.plan.metrics import Stats
from tokenmill.plan.planner import PlanResult


def _stats_ms(s: Stats) -> dict[str, float]:
    return {k: round(v * 1e3, 3) for k, v in asdict(s).items()}


def to_json(r: PlanResult) -> dict[str, Any]:
    m, e, pl = r.metrics, r.economics, r.placement
    reps = pl.replicas
    slo = r.request.slo
    return {
        "model": r.model.name,
        "model_source": r.model.source,
        "hardware": r.hardware.name,
        "hardware_display_name": r.hardware.display_name,
        "precision": asdict(r.request.precision),
        "workload": r.workload,
        "chips": pl.num_chips,
        "placement": {
            "tp": pl.tp,
            "pp": pl.pp,
            "replicas": reps,
            "chips_per_replica": pl.chips_per_replica,
            "layers_per_stage": [s.num_layers for s in pl.stages],
            "kv_capacity_tokens": pl.kv_capacity_tokens,
            "explanation": pl.explanation,
        },
        "ttft_s": m.ttft.median,
        "tpot_s": m.tpot.median,
        "itl_s": m.itl.median,
        "e2e_s": m.e2e.median,
        "ttft_ms": _stats_ms(m.ttft),
        "tpot_ms": _stats_ms(m.tpot),
        "itl_ms": _stats_ms(m.itl),
        "e2e_ms": _stats_ms(m.e2e),
        "per_user_tok_s": m.per_user_tok_s,
        "throughput_tok_s": r.output_tok_s,
        "offered_tok_s": None if m.offered_tok_s is None else m.offered_tok_s * r.scale,
        "overloaded": m.is_overloaded,
        "input_throughput_tok_s": r.input_tok_s,
        "request_throughput_s": m.request_s * r.scale,
        "throughput_per_chip_tok_s": e.output_tok_s_per_chip,
        "tokens_per_usd": e.output_tok_per_usd,
        "hourly_usd": e.hourly_usd,
        "cost_per_mtok_usd": e.cost_per_mtok_usd,
        "cost_per_mtok_input_usd": e.cost_per_mtok_input_usd,
        "cost_per_mtok_output_usd": e.cost_per_mtok_output_usd,
        "joules_per_token": e.joules_per_token,
        "power_kw": e.power_kw,
        "slo": None if slo is None else _slo_json(r),
        "notes": list(r.notes),
        "sim": {
            "requests_per_replica": m.num_requests,
            "steps": r.num_steps,
            "duration_s": m.duration_s,
            "wall_s": r.sim_wall_s,
            "preemptions": m.num_preemptions,
        },
    }


def _slo_json(r: PlanResult) -> dict[str, Any]:
    m = r.metrics
    return {
        "target": r.request.slo.describe(),
        "policy": r.request.slo_policy,
        "attainment": m.slo_attainment,  # of all requests: a refused one missed
        "attainment_admitted": m.slo_attainment_admitted,
        "refused_share": m.refused_share,
        "meets": m.meets_slo,
        "goodput_req_s": (m.goodput_req_s or 0.0) * r.scale,
        "goodput_tok_s": (m.goodput_tok_s or 0.0) * r.scale,
    }


def _slo_text(r: PlanResult) -> list[str]:
    m, slo, policy = r.metrics, r.request.slo, r.request.slo_policy
    verdict = "MEETS" if m.meets_slo else "MISSES"
    goodput = f"goodput {(m.goodput_req_s or 0) * r.scale:,.2f} req/s"
    if policy == "off":
        return [
            f"{'SLO':<11}{slo.describe()}: {m.slo_attainment:.1%} of requests within -> {verdict} "
            f"({goodput})"
        ]
    return [
        f"{'SLO':<11}{slo.describe()} under --slo-policy {policy}: {m.refused_share:.1%} "
        f"refused; {m.slo_attainment_admitted:.1%} of admitted and {m.slo_attainment:.1%} of "
        f"all requests within -> {verdict}",
        f"{'goodput':<11}{(m.goodput_req_s or 0) * r.scale:,.2f} req/s, "
        f"{(m.goodput_tok_s or 0) * r.scale:,.0f} output tok/s within every target",
    ]


def _row(name: str, s: Stats, scale: float, fmt: str) -> str:
    vals = (s.mean, s.median, s.p90, s.p99)
    return f"  {name:<10}" + "".join(f"{v * scale:>11{fmt}}" for v in vals)


def _wrap(label: str, text: str) -> str:
    return textwrap.fill(text, 98, initial_indent=f"{label:<11}", subsequent_indent=" " * 11)


def to_text(r: PlanResult) -> str:
    m, e, pl = r.metrics, r.economics, r.placement
    reps = pl.replicas
    hw = r.hardware
    lines = [
        f"tokenmill plan: {r.model.name} on {hw.name} ({hw.display_name})",
        _wrap("workload", r.workload + (f" (per replica, x{reps})" if reps > 1 else "")),
        _wrap("precision", r.request.precision.describe()),
        _wrap("placement", pl.explanation),
        "",
        f"  {'latency':<10}{'mean':>11}{'median':>11}{'p90':>11}{'p99':>11}",
        _row("TTFT ms", m.ttft, 1e3, ",.1f"),
        _row("TPOT ms", m.tpot, 1e3, ",.2f"),
        _row("ITL ms", m.itl, 1e3, ",.2f"),
        _row("E2E s", m.e2e, 1, ",.2f"),
        "",
        f"{'throughput':<11}{r.output_tok_s:,.0f} output tok/s "
        f"({e.output_tok_s_per_chip:,.1f} per chip), {r.input_tok_s:,.0f} input tok/s, "
        f"{m.request_s * r.scale:,.2f} req/s",
        f"{'per user':<11}{m.per_user_tok_s:,.1f} tok/s (1 / median TPOT)",
        f"{'cost':<11}{pl.num_chips} x {hw.economics.describe()} = ${e.hourly_usd:,.2f}/h -> "
        f"${e.cost_per_mtok_usd:,.3f} per M output tokens",
        f"{'':<11}by time share: ${e.cost_per_mtok_input_usd:,.3f}/M input, "
        f"${e.cost_per_mtok_output_usd:,.3f}/M output; {e.output_tok_per_usd:,.0f} output tok per $",
        f"{'energy':<11}{e.joules_per_token:,.3f} J per output token at rated power "
        f"({e.power_kw:,.2f} kW)",
    ]
    if r.request.slo is not None:
        lines += _slo_text(r)
    lines.append(
        f"{'simulated':<11}{m.num_requests} requests measured per replica, {r.num_steps:,} steps, "
        f"{m.duration_s:,.1f} s virtual in {r.sim_wall_s:.1f} s"
    )
    lines += [_wrap("note", n) for n in r.notes]
    return "\n".join(lines)
