"""The crossover chart: each hardware across a range of load (concurrency or rate), per-user
speed against $ per million output tokens and joules per token, so where SRAM chips win and
where GPUs do can be read off one picture.

Hardware is named as in --compare, optionally with a chip count: `h100x8` is a node of eight
H100s used as the chip-budget search decides (one wide replica or several narrow ones).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenmill.errors import ConfigError
from tokenmill.plan.hardware import get_hardware
from tokenmill.plan.planner import PlanRequest, PlanResult, build_sample, run_plan
from tokenmill.plan.search import best_on_chips
from tokenmill.workload.sharegpt import TextEncoder

SWEEP_KEYS = ("concurrency", "rate")


@dataclass(frozen=True)
class SweepPoint:
    label: str  # hardware as named, e.g. h100x8
    load: float  # the concurrency or rate of this point
    result: PlanResult | None
    error: str | None = None


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """`concurrency=1,4,16` or `rate=1,10,100` -> (key, values)."""
    key, sep, raw = text.partition("=")
    key = key.strip().lower()
    if not sep or key not in SWEEP_KEYS:
        raise ConfigError(f"bad --sweep {text!r}; use concurrency=1,4,16,64 or rate=1,10,100")
    try:
        values = [float(v) for v in raw.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"bad --sweep value in {text!r}") from None
    if not values or min(values) <= 0:
        raise ConfigError(f"--sweep {text!r} needs positive values")
    if key == "concurrency" and any(v != int(v) for v in values):
        raise ConfigError(f"--sweep {text!r}: concurrency values are whole numbers")
    return key, values


def parse_hardware_item(item: str) -> tuple[str, int | None]:
    """`h100x8` -> ("h100", 8); `groq-lpu` -> ("groq-lpu", None)."""
    match = re.fullmatch(r"(.+?)x(\d+)", item.strip())
    if match and _known(match.group(1)):
        return get_hardware(match.group(1)).name, int(match.group(2))
    return get_hardware(item).name, None


def _known(name: str) -> bool:
    try:
        get_hardware(name)
    except ConfigError:
        return False
    return True


def _with_load(base: PlanRequest, key: str, value: float) -> PlanRequest:
    if key == "concurrency":
        return dataclasses.replace(base, concurrency=int(value), rate=None)
    return dataclasses.replace(base, rate=value, concurrency=None)


def sweep(
    base: PlanRequest,
    hardware: Sequence[str],
    key: str,
    values: Sequence[float],
    tokenizer_loader: Callable[[], TextEncoder] | None = None,
) -> list[SweepPoint]:
    """Every hardware at every load value (one length sample per value, shared)."""
    items = [(label, *parse_hardware_item(label)) for label in hardware]
    points = []
    for value in values:
        req_v = _with_load(base, key, value)
        sample = build_sample(req_v, tokenizer_loader)
        for label, name, chips in items:
            req = dataclasses.replace(req_v, hardware=name, chips=chips, replicas=1)
            try:
                if chips:
                    result, _ = best_on_chips(req, sample)
                else:
                    result = run_plan(req, sample=sample)
                points.append(SweepPoint(label, value, result))
            except ConfigError as exc:
                points.append(SweepPoint(label, value, None, str(exc)))
    return points


def crossover(points: Sequence[SweepPoint]) -> list[tuple[float, str, str, str]]:
    """Per load value: (value, cheapest per token, fastest per user, least energy per token)."""
    rows = []
    for value in sorted({p.load for p in points}):
        ok = [p for p in points if p.load == value and p.result is not None]
        if not ok:
            continue
        cheapest = min(ok, key=lambda p: p.result.economics.cost_per_mtok_usd).label
        fastest = max(ok, key=lambda p: p.result.metrics.per_user_tok_s).label
        frugal = min(ok, key=lambda p: p.result.economics.joules_per_token).label
        rows.append((value, cheapest, fastest, frugal))
    return rows


def plot_sweep(points: Sequence[SweepPoint], key: str, path: str, title: str) -> None:
    """Two panels: $/Mtok and J/token against tokens/s per user, one line per hardware through
    its load values (each point labelled with its value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    labels = list(dict.fromkeys(p.label for p in points))
    for i, label in enumerate(labels):
        mine = sorted((p for p in points if p.label == label and p.result), key=lambda p: p.load)
        if not mine:
            continue
        x = [p.result.metrics.per_user_tok_s for p in mine]
        for ax, y in zip(
            axes,
            ([p.result.economics.cost_per_mtok_usd for p in mine],
             [p.result.economics.joules_per_token for p in mine]),
            strict=True,
        ):  # fmt: skip
            ax.plot(x, y, "o-", color=f"C{i % 10}", label=label, linewidth=1.5)
            for p, xi, yi in zip(mine, x, y, strict=True):
                ax.annotate(f"{p.load:g}", (xi, yi), fontsize=8, xytext=(4, 4),
                            textcoords="offset points", color=f"C{i % 10}")  # fmt: skip
    for ax, ylabel in zip(axes, ("$ per million output tokens", "joules per output token"),
                          strict=True):  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens/s per user (1 / median TPOT)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9, title=f"point labels: {key}", title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
