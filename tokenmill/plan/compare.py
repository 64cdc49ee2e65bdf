"""Rank hardware for one model and workload, find the cheapest configuration that meets the SLO,
and draw cost per million tokens against tokens/s per user.

Per hardware, configurations are tried in order of chip count: the fewest chips that fit, then
up to four times as many (wider tensor parallel where the link domain allows, deeper pipelines,
or more replicas). With an SLO the search stops at the first configuration that meets it; without, the
first two are kept for the plot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenmill.errors import ConfigError
from tokenmill.plan.hardware import get_hardware
from tokenmill.plan.models import get_model
from tokenmill.plan.placement import place, tp_candidates
from tokenmill.plan.planner import PlanRequest, PlanResult, kv_target, replica_workload, run_plan
from tokenmill.workload.sharegpt import TextEncoder
from tokenmill.workload.spec import parse_workload
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


def _configs(base: PlanRequest, min_chips: int, widths: Sequence[int]) -> list[PlanRequest]:
    """The fewest chips, then up to 4x as many: wider tensor-parallel widths, deeper pipelines,
    more replicas; in order of chip count."""
    sizes = {min_chips * f for f in (2, 4)} | {t for t in widths if min_chips < t <= 4 * min_chips}
    configs = [(min_chips, 1)] + [(n, 1) for n in sizes] + [(min_chips, r) for r in (2, 4)]
    configs.sort(key=lambda c: (c[0] * c[1], c[1]))
    return [
        dataclasses.replace(base, chips=None if n == min_chips else n, replicas=r)
        for n, r in configs
    ]


class _Workloads:
    """Each replica count's workload, built once (ShareGPT sampling tokenizes) and shared by
    every hardware."""

    def __init__(self, base: PlanRequest, loader: Callable[[], TextEncoder] | None) -> None:
        self.base = base
        self.spec = parse_workload(base.workload)
        self.loader = loader
        self._cache: dict[int, Workload] = {}

    def get(self, replicas: int) -> Workload:
        if replicas not in self._cache:
            tokenizer = self.loader() if self.spec.needs_tokenizer and self.loader else None
            req = dataclasses.replace(self.base, replicas=replicas)
            self._cache[replicas] = replica_workload(req, self.spec, tokenizer)
        return self._cache[replicas]


def _try(req: PlanRequest, workloads: _Workloads) -> CompareEntry:
    try:
        return CompareEntry(req.hardware, run_plan(req, workload=workloads.get(req.replicas)))
    except ConfigError as exc:
        return CompareEntry(req.hardware, None, str(exc))


def _hardware_entries(req: PlanRequest, workloads: _Workloads) -> list[CompareEntry]:
    model, hw = get_model(req.model), get_hardware(req.hardware)
    try:
        _, kv_tokens = kv_target(req, workloads.get(1))
        n0 = place(model.arch, hw, req.precision, kv_tokens).chips_per_replica
    except ConfigError as exc:
        return [CompareEntry(req.hardware, None, str(exc))]
    tried: list[CompareEntry] = []
    for cfg in _configs(req, n0, tp_candidates(model.arch, hw)):
        entry = _try(cfg, workloads)
        if entry.result is None and tried:
            continue
        tried.append(entry)
        if req.slo is not None and entry.meets_slo:
            break
        if req.slo is None and len(tried) == 2:
            break
    return tried


def compare(
    base: PlanRequest,
    hardware: Sequence[str],
    tokenizer_loader: Callable[[], TextEncoder] | None = None,
) -> Comparison:
    """Every configuration tried on each of `hardware`, ranked; the cheapest meeting the SLO."""
    workloads = _Workloads(base, tokenizer_loader)
    entries: list[CompareEntry] = []
    for name in hardware:
        req = dataclasses.replace(base, hardware=get_hardware(name).name, chips=None, replicas=1)
        entries.extend(_hardware_entries(req, workloads))
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
