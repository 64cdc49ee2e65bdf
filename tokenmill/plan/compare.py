"""Rank hardware for one model and workload, find the cheapest configuration that meets the SLO,
and draw cost per million tokens against tokens/s per user.

With an SLO, each hardware is sized (plan/search.py): every design's fewest replicas meeting the
SLO, with no cap on the chips; the cheapest wins. Without one, each hardware's default placement
(the fewest chips, in the vendor's node size) and the best use of twice as many chips are kept
for the plot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenmill.errors import ConfigError
from tokenmill.plan.hardware import get_hardware
from tokenmill.plan.planner import PlanRequest, PlanResult, build_sample, run_plan
from tokenmill.plan.search import best_on_chips, size
from tokenmill.workload.sharegpt import TextEncoder
from tokenmill.workload.types import Workload


@dataclass(frozen=True)
class CompareEntry:
    hardware: str
    result: PlanResult | None
    error: str | None = None

    @property
    def cost(self) -> float:
        return self.result.economics.cost_per_mtok_usd if self.result else float("inf")

    @property
    def meets_slo(self) -> bool | None:
        return self.result.metrics.meets_slo if self.result else False


@dataclass(frozen=True)
class Comparison:
    entries: tuple[CompareEntry, ...]  # every configuration tried, ranked
    cheapest: CompareEntry | None  # cheapest meeting the SLO (or cheapest overall without one)
    pareto: tuple[int, ...]  # indices into entries on the cost / per-user-speed frontier

    def best_per_hardware(self) -> list[CompareEntry]:
        """One entry per hardware, ranked: its cheapest meeting the SLO, else the one closest
        to meeting it (highest attainment, then cheapest); hardware that did not fit last."""
        best: dict[str, CompareEntry] = {}
        for e in self.entries:
            cur = best.get(e.hardware)
            if cur is None or _preference(e) < _preference(cur):
                best[e.hardware] = e
        return sorted(best.values(), key=_preference)


def _preference(e: CompareEntry) -> tuple:
    if e.result is None:
        return (2, 0.0, 0.0)
    attained = e.result.metrics.slo_attainment
    return (0 if e.meets_slo in (True, None) else 1, -(attained or 0.0), e.cost)


def _hardware_entries(req: PlanRequest, sample: Workload) -> list[CompareEntry]:
    try:
        if req.slo is not None:
            sizing = size(req, sample)
            return [CompareEntry(req.hardware, r) for r in sizing.tried] or [
                CompareEntry(req.hardware, None, "; ".join(sizing.notes) or "no layout fits")
            ]
        first = run_plan(req, sample=sample)
        wider = dataclasses.replace(req, chips=2 * first.placement.chips_per_replica)
        _, tried = best_on_chips(wider, sample)
        return [CompareEntry(req.hardware, first)] + [CompareEntry(req.hardware, r) for r in tried]
    except ConfigError as exc:
        return [CompareEntry(req.hardware, None, str(exc))]


def compare(
    base: PlanRequest,
    hardware: Sequence[str],
    tokenizer_loader: Callable[[], TextEncoder] | None = None,
) -> Comparison:
    """Every configuration tried on each of `hardware`, ranked; the cheapest meeting the SLO."""
    sample = build_sample(base, tokenizer_loader)
    entries: list[CompareEntry] = []
    for name in hardware:
        req = dataclasses.replace(base, hardware=get_hardware(name).name, chips=None, replicas=1)
        entries.extend(_hardware_entries(req, sample))
    ranked = sorted(entries, key=lambda e: (e.result is None, not e.meets_slo, e.cost))
    ok = [e for e in ranked if e.result is not None and (base.slo is None or e.meets_slo)]
    return Comparison(tuple(ranked), ok[0] if ok else None, _pareto(ranked))


def _pareto(entries: Sequence[CompareEntry]) -> tuple[int, ...]:
    """Entries no other beats on both cost (lower) and per-user speed (higher)."""
    points = [
        (i, e.cost, e.result.metrics.per_user_tok_s)
        for i, e in enumerate(entries)
        if e.result is not None
    ]
    front = []
    for i, cost, speed in points:
        dominated = any(c <= cost and s >= speed and (c < cost or s > speed) for _, c, s in points)
        if not dominated:
            front.append(i)
    return tuple(front)


def config_label(r: PlanResult) -> str:
    pl = r.placement
    label = f"{r.hardware.name} x{pl.num_chips}"
    if pl.replicas > 1:
        label += f" ({pl.replicas}x TP{pl.tp}xPP{pl.pp})"
    else:
        label += f" (TP{pl.tp}xPP{pl.pp})"
    return label


def plot_pareto(comparison: Comparison, path: str, title: str) -> None:
    """Cost per million output tokens against tokens/s per user, one colour per hardware,
    the frontier joined (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    colors: dict[str, str] = {}
    for i, e in enumerate(comparison.entries):
        if e.result is None:
            continue
        x, y = e.result.metrics.per_user_tok_s, e.cost
        first = e.hardware not in colors
        colors.setdefault(e.hardware, f"C{len(colors) % 10}")
        ax.scatter(
            x,
            y,
            color=colors[e.hardware],
            s=70 if i in comparison.pareto else 30,
            marker="x" if e.meets_slo is False else "o",
            label=e.hardware if first else None,
        )
        ax.annotate(
            config_label(e.result).split(" ", 1)[1],
            (x, y),
            fontsize=6,
            xytext=(4, 3),
            textcoords="offset points",
        )
    front = sorted(
        (comparison.entries[i].result.metrics.per_user_tok_s, comparison.entries[i].cost)
        for i in comparison.pareto
    )
    if front:
        ax.plot(*zip(*front, strict=True), "k--", linewidth=1, label="Pareto frontier")
    ax.legend(fontsize=8, title="x: misses the SLO", title_fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s per user (1 / median TPOT)")
    ax.set_ylabel("$ per million output tokens")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
