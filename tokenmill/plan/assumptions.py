"""Every figure the planner did not read from a published specification: the catalogue's
[guess], [fitted], [secondary] and [derived] figures, and the planner's own constants, each with
its source. `tokenmill plan --list --verbose` prints them; a prediction is only as good as these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenmill.plan import hardware as hw_module
from tokenmill.plan import load, metrics

TAGS = ("fitted", "guess", "secondary", "derived")
_TAG = re.compile(r"\[(fitted|guess|secondary|derived)[^\]]*\]")


@dataclass(frozen=True)
class Assumption:
    owner: str  # a hardware name, or "planner"
    figure: str  # its path in the catalogue file, or the constant's name
    value: float
    tag: str  # fitted | guess | secondary | derived
    source: str


def planner_constants() -> list[Assumption]:
    """Constants in the planner's code that shape every prediction."""
    return [
        Assumption("planner", "ELECTRICITY_USD_PER_KWH", hw_module.ELECTRICITY_USD_PER_KWH,
                   "guess", "a round figure near US industrial rates (owned hardware only)"),
        Assumption("planner", "PERIODS_MEASURED", load.PERIODS_MEASURED, "guess",
                   "a rate's measured window spans this many request lifetimes (at least "
                   f"{load.DEFAULT_OPEN_SAMPLE}, at most {load.MAX_OPEN_SAMPLE} requests); twice "
                   "as long moves the metrics by under 2% (tests/test_plan_steady_state.py)"),
        Assumption("planner", "MIN_PERIODS", load.MIN_PERIODS, "guess",
                   "a measured window shorter than this many request lifetimes is run again "
                   "longer: shorter ones cannot tell a growing queue from noise"),
        Assumption("planner", "OVERLOAD_SHARE", metrics.OVERLOAD_SHARE, "guess",
                   "produced / offered output below this (and latency growing by "
                   f"{metrics.LATENCY_GROWTH}x over the window) marks a run overloaded"),
    ]  # fmt: skip


def hardware_assumptions(name: str) -> list[Assumption]:
    """The tagged figures of one catalogue entry, in file order."""
    spec = hw_module.get_hardware(name)
    values = _values(hw_module.raw_entry(spec.name))
    found = []
    for path, source in spec.sources.items():
        match = _TAG.search(source)
        if match:
            found.append(
                Assumption(name, path, values.get(path, float("nan")), match.group(1), source)
            )
    return found


def _values(raw: dict, path: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, val in raw.items():
        if isinstance(val, dict) and "value" in val:
            out[f"{path}{key}"] = val["value"]
        elif isinstance(val, dict):
            out.update(_values(val, f"{path}{key}."))
        elif isinstance(val, list):
            for tier in val:
                if isinstance(tier, dict) and "name" in tier:
                    out.update(_values(tier, f"{path}{key}.{tier['name']}."))
    return out


def all_assumptions() -> list[Assumption]:
    found = planner_constants()
    for name in hw_module.list_hardware():
        found += hardware_assumptions(name)
    return found


def format_assumptions(items: list[Assumption]) -> str:
    lines = [f"{len(items)} figures not read from a published specification:"]
    owner = None
    for a in items:
        if a.owner != owner:
            owner = a.owner
            lines.append(f"  {owner}:")
        lines.append(f"    [{a.tag}] {a.figure} = {a.value:g}  ({a.source})")
    return "\n".join(lines)
