"""`tokenmill plan --sweep concurrency=1,4,16 --compare h100x8,groq-lpu,...`: the crossover chart
as a table and a plot (tokenmill.plan.sweep)."""

from __future__ import annotations

import json

from tokenmill.errors import ConfigError

DEFAULT_SWEEP_PLOT = "plan-sweep.png"


def run_sweep(args, request, loader, notes: list[str]) -> int:
    from tokenmill.cli.plan_compare import hardware_names
    from tokenmill.plan.report import to_json
    from tokenmill.plan.sweep import parse_sweep, plot_sweep, sweep

    names = hardware_names(args.compare or args.hardware or "")
    if not names:
        raise ConfigError("--sweep needs --compare NAME,NAME,... (e.g. h100x8,groq-lpu)")
    key, values = parse_sweep(args.sweep)
    points = sweep(request, names, key, values, loader)
    plot = args.plot or DEFAULT_SWEEP_PLOT
    title = f"{request.model}, {request.workload}, {request.precision.describe()}"
    if plot != "none" and any(p.result for p in points):
        plot_sweep(points, key, plot, title)
    if args.json:
        rows = [
            {"hardware": p.label, key: p.load, "error": p.error}
            if p.result is None
            else {"hardware": p.label, key: p.load, **to_json(p.result)}
            for p in points
        ]
        print(json.dumps({"points": rows, "plot": None if plot == "none" else plot,
                          "notes": notes}, indent=2))  # fmt: skip
        return 0
    print(format_sweep(points, key, title))
    if plot != "none":
        print(f"plot: {plot}")
    for note in notes:
        print(f"note: {note}")
    return 0


def format_sweep(points, key: str, title: str) -> str:
    from tokenmill.plan.compare import config_label
    from tokenmill.plan.sweep import crossover

    lines = [
        f"tokenmill plan --sweep {key}: {title}",
        f"{'hardware':<16}{key:>12}  {'deployment':<30}{'tok/s/user':>11}{'tok/s':>11}"
        f"{'$/Mtok':>10}{'J/tok':>9}",
    ]
    for p in points:
        if p.result is None:
            lines.append(f"{p.label:<16}{p.load:>12g}  {p.error}")
            continue
        r = p.result
        lines.append(
            f"{p.label:<16}{p.load:>12g}  {config_label(r):<30}{r.metrics.per_user_tok_s:>11,.1f}"
            f"{r.output_tok_s:>11,.0f}{r.economics.cost_per_mtok_usd:>10,.3f}"
            f"{r.economics.joules_per_token:>9,.3f}"
        )
    lines.append(f"{key:>12}  {'cheapest per token':<22}{'fastest per user':<22}least J/token")
    for value, cheap, fast, frugal in crossover(points):
        lines.append(f"{value:>12g}  {cheap:<22}{fast:<22}{frugal}")
    return "\n".join(lines)
