"""`tokenmill plan --compare / --size`: rank hardware, size a deployment for an SLO, as tables
(and a Pareto plot of cost against tokens/s per user)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

DEFAULT_PLOT = "plan-pareto.png"


def hardware_names(text: str) -> list[str]:
    from tokenmill.plan.hardware import THIS_MACHINE, list_hardware

    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        names = [n for n in list_hardware() if n != THIS_MACHINE]
    return names


def run_compare(args, request, loader, notes: list[str]) -> int:
    from tokenmill.plan.compare import compare, plot_pareto
    from tokenmill.plan.report import to_json

    comparison = compare(request, hardware_names(args.compare), loader)
    plot = args.plot or DEFAULT_PLOT
    title = f"{request.model}, {request.workload}, {request.precision.describe()}"
    if plot != "none" and any(e.result for e in comparison.entries):
        plot_pareto(comparison, plot, title)
    if args.json:
        print(json.dumps({**_compare_json(comparison, plot, to_json), "notes": notes}, indent=2))
    else:
        print(_compare_text(comparison, request, plot))
        for note in notes:
            print(f"note: {note}")
    return 0


def _compare_json(comparison, plot: str, to_json: Callable[[Any], dict]) -> dict:
    results = [
        to_json(e.result) if e.result else {"hardware": e.hardware, "error": e.error}
        for e in comparison.entries
    ]
    cheapest = comparison.cheapest
    return {
        "results": results,
        "cheapest": None if cheapest is None else to_json(cheapest.result),
        "pareto": list(comparison.pareto),
        "plot": None if plot == "none" else plot,
    }


def verdict(m) -> str:
    if m.meets_slo is None:
        return "overloaded" if m.is_overloaded else "-"
    return "meets" if m.meets_slo else f"misses ({m.slo_attainment:.0%})"


HEADER = (
    f"{'tok/s/user':>11}{'TTFT p99':>10}{'TPOT p99':>10}{'tok/s':>10}{'$/Mtok':>9}{'J/tok':>8}  SLO"
)


def result_columns(r) -> str:
    m, econ = r.metrics, r.economics
    return (
        f"{m.per_user_tok_s:>11,.1f}{m.ttft.p99 * 1e3:>8,.0f}ms{m.tpot.p99 * 1e3:>8,.1f}ms"
        f"{r.output_tok_s:>10,.0f}{econ.cost_per_mtok_usd:>9,.3f}"
        f"{econ.joules_per_token:>8,.2f}  {verdict(m)}"
    )


def _compare_text(comparison, request, plot: str) -> str:
    from tokenmill.plan.compare import config_label

    slo = request.slo.describe() if request.slo else "none"
    lines = [
        f"tokenmill plan --compare: {request.model}, {request.precision.describe()}; SLO {slo}",
        f"{'rank':>4}  {'best configuration tried':<32}{HEADER}",
    ]
    pareto = {id(comparison.entries[i]) for i in comparison.pareto}
    for rank, e in enumerate(comparison.best_per_hardware(), 1):
        if e.result is None:
            lines.append(f"{'-':>4}  {e.hardware}: {e.error}")
            continue
        front = "*" if id(e) in pareto else " "
        lines.append(f"{rank:>4}{front} {config_label(e.result):<32}{result_columns(e.result)}")
    first = next((e.result for e in comparison.entries if e.result), None)
    if first is not None:
        lines.insert(1, f"workload: {first.workload}")
    best = comparison.cheapest
    if best is None:
        lines.append(f"no configuration tried meets the SLO ({slo})")
    else:
        what = "meeting the SLO" if request.slo else "per output token"
        lines.append(
            f"cheapest {what}: {config_label(best.result)} at ${best.cost:,.3f} per M output tokens"
        )
    lines.append(
        f"{len(comparison.entries)} configurations simulated (all in --json); "
        "* = on the Pareto frontier of cost vs tokens/s per user"
    )
    if plot != "none":
        lines.append(f"Pareto plot (every configuration): {plot}")
    return "\n".join(lines)


def run_size(args, request, loader, notes: list[str]) -> int:
    """`--size --hardware X`: every design's fewest replicas meeting the SLO, cheapest first."""
    from tokenmill.plan.compare import config_label
    from tokenmill.plan.planner import build_sample
    from tokenmill.plan.report import to_json
    from tokenmill.plan.search import size

    sizing = size(request, build_sample(request, loader))
    if args.json:
        print(json.dumps({
            "best": None if sizing.best is None else to_json(sizing.best),
            "designs": [to_json(r) for r in sizing.per_design],
            "simulated": len(sizing.tried),
            "notes": list(sizing.notes) + notes,
        }, indent=2))  # fmt: skip
        return 0
    load = f"{request.rate:g} req/s" if request.rate else f"{request.concurrency} users"
    lines = [
        f"tokenmill plan --size: {request.model} on {request.hardware} at {load}; "
        f"SLO {request.slo.describe()}",
        f"{'':>4}  {'fewest replicas meeting it':<32}{HEADER}",
    ]
    for i, r in enumerate(sizing.per_design):
        mark = "best" if i == 0 else ""
        lines.append(f"{mark:>4}  {config_label(r):<32}{result_columns(r)}")
    if sizing.best is None:
        lines.append("no design meets the SLO at any replica count")
    lines += [f"note: {n}" for n in (*sizing.notes, *notes)]
    lines.append(f"{len(sizing.tried)} configurations simulated; ranked by $/Mtok, then J/token")
    print("\n".join(lines))
    return 0
