"""The hardware catalogue: one TOML file per device under catalogue/, a source beside every
figure, loaded into a HardwareSpec (a perf profile plus links, economics and the sources).

Adding a device is adding a file. "this-machine" is special: the calibration command writes a
fitted profile (same schema, as JSON) to the user's tokenmill folder, which then replaces the
bundled uncalibrated default.
"""

from __future__ import annotations

import copy
import functools
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tokenmill.env import home_dir
from tokenmill.errors import ConfigError
from tokenmill.perf.profile import AttentionUnit, HardwareProfile, MemoryTier

THIS_MACHINE = "this-machine"
HOURS_PER_YEAR = 8760
# Electricity for owned hardware; rental prices already include it.
ELECTRICITY_USD_PER_KWH = 0.10  # [guess] a round figure near US industrial rates


def user_dir() -> Path:
    """Where tokenmill keeps per-user state (TOKENMILL_HOME, default ~/.cache/tokenmill)."""
    return home_dir()


def calibrated_path() -> Path:
    return user_dir() / f"{THIS_MACHINE}.json"


@dataclass(frozen=True)
class LinkSpec:
    """A chip-to-chip link: per-direction bandwidth per chip, per-hop latency, and how many
    chips it connects directly (the tensor-parallel domain)."""

    bandwidth_bytes_s: float
    latency_s: float
    domain_size: int = 1


@dataclass(frozen=True)
class Economics:
    power_w: float
    price_per_hour_usd: float | None = None  # rental, power included
    chip_price_usd: float | None = None  # purchase, amortised over lifetime_years plus power
    lifetime_years: float | None = None

    def hourly_cost_usd(self) -> float:
        """What one chip costs per hour of service."""
        if self.price_per_hour_usd is not None:
            return self.price_per_hour_usd
        capex = self.chip_price_usd / (self.lifetime_years * HOURS_PER_YEAR)
        return capex + self.power_w / 1000 * ELECTRICITY_USD_PER_KWH

    def describe(self) -> str:
        if self.price_per_hour_usd is not None:
            return f"${self.price_per_hour_usd:.2f}/h rental"
        return (
            f"${self.chip_price_usd:,.0f} over {self.lifetime_years:g} y + power "
            f"= ${self.hourly_cost_usd():.2f}/h"
        )


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    display_name: str
    kind: str  # gpu | sram-chip | wafer | dataflow | cpu
    scheduling: str  # static | dynamic
    profile: HardwareProfile
    scale_up: LinkSpec
    scale_out: LinkSpec | None
    economics: Economics
    sources: dict[str, str] = field(hash=False)
    aliases: tuple[str, ...] = ()
    calibrated: bool | None = None  # only this-machine says
    deployment_unit: int = 1  # chips the vendor deploys together (a node); replicas fill them
    # Tensor-parallel all-reduces run under the weight stream, not after it (plan/step_time.py).
    overlaps_communication: bool = False

    @property
    def is_static(self) -> bool:
        return self.scheduling == "static"


class _Figures:
    """Reads { value, source } tables and remembers each figure's source."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.sources: dict[str, str] = {}

    def get(self, table: dict[str, Any], key: str, path: str, default: Any = None) -> Any:
        if key not in table:
            if default is not None:
                return default
            raise ConfigError(f"{self.origin}: missing figure {path}.{key}")
        fig = table[key]
        if not isinstance(fig, dict) or "value" not in fig or not str(fig.get("source", "")):
            raise ConfigError(
                f"{self.origin}: {path}.{key} must be {{ value = ..., source = ... }}"
            )
        if not isinstance(fig["value"], int | float) or isinstance(fig["value"], bool):
            raise ConfigError(f"{self.origin}: {path}.{key} value must be a number")
        self.sources[f"{path}.{key}"] = fig["source"]
        return float(fig["value"])


def spec_from_dict(raw: dict[str, Any], origin: str) -> HardwareSpec:
    """Build a HardwareSpec from a parsed catalogue file; ConfigError names what is wrong."""
    figs = _Figures(origin)
    try:
        name = raw["name"]
        tiers = tuple(_tier(figs, t) for t in raw["memory"])
        compute = raw["compute"]
        runtime = raw.get("runtime", {})
        links = raw.get("links", {})
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{origin}: missing section or key {exc}") from exc
    peaks = {
        key.removesuffix("_tflops"): figs.get(compute, key, "compute") * 1e12
        for key in compute
        if key.endswith("_tflops")
    }
    unit = raw.get("attention_unit")
    profile = HardwareProfile(
        name=name,
        tiers=tiers,
        peak_flops=peaks,
        compute_efficiency=figs.get(compute, "efficiency", "compute"),
        per_step_overhead_s=_us(figs, runtime, "per_step_overhead_us"),
        per_request_overhead_s=_us(figs, runtime, "per_request_overhead_us"),
        per_prefill_overhead_s=_us(figs, runtime, "per_prefill_overhead_us"),
        per_kernel_overhead_s=_us(figs, runtime, "per_kernel_overhead_us"),
        attention_unit=None
        if unit is None
        else AttentionUnit(
            figs.get(unit, "tflops", "attention_unit") * 1e12,
            figs.get(unit, "efficiency", "attention_unit"),
        ),
        overlap_compute_memory=bool(raw.get("overlap_compute_memory", True)),
        step_jitter_cv=figs.get(runtime, "step_jitter_cv", "runtime", 0.0),
        usable_memory_fraction=figs.get(runtime, "usable_memory_fraction", "runtime", 0.9),
    )
    econ = raw.get("economics", {})
    return HardwareSpec(
        name=name,
        display_name=raw.get("display_name", name),
        kind=raw.get("kind", "gpu"),
        scheduling=raw.get("scheduling", "dynamic"),
        profile=profile,
        scale_up=_link(figs, links.get("scale_up"), "links.scale_up") or LinkSpec(1e9, 1e-5, 1),
        scale_out=_link(figs, links.get("scale_out"), "links.scale_out"),
        economics=_economics(figs, econ),
        sources=figs.sources,
        aliases=tuple(raw.get("aliases", ())),
        calibrated=raw.get("calibrated"),
        deployment_unit=int(figs.get(raw.get("deployment", {}), "unit_chips", "deployment", 1.0)),
        overlaps_communication=bool(raw.get("overlap_communication", False)),
    )


def _tier(figs: _Figures, raw: dict[str, Any]) -> MemoryTier:
    path = f"memory.{raw['name']}"
    return MemoryTier(
        name=raw["name"],
        capacity_bytes=figs.get(raw, "capacity_gb", path) * 1e9,
        bandwidth_bytes_s=figs.get(raw, "bandwidth_gb_s", path) * 1e9,
        holds=tuple(raw.get("holds", ())),
        efficiency=figs.get(raw, "efficiency", path, 1.0),
    )


def _us(figs: _Figures, table: dict[str, Any], key: str) -> float:
    return figs.get(table, key, "runtime", 0.0) * 1e-6


def _link(figs: _Figures, raw: dict[str, Any] | None, path: str) -> LinkSpec | None:
    if raw is None:
        return None
    domain = figs.get(raw, "domain_size", path, 1.0)
    return LinkSpec(
        figs.get(raw, "bandwidth_gb_s", path) * 1e9,
        figs.get(raw, "latency_us", path) * 1e-6,
        int(domain),
    )


def _economics(figs: _Figures, raw: dict[str, Any]) -> Economics:
    power = figs.get(raw, "power_w", "economics")
    if "price_per_hour_usd" in raw:
        return Economics(power, price_per_hour_usd=figs.get(raw, "price_per_hour_usd", "economics"))
    return Economics(
        power,
        chip_price_usd=figs.get(raw, "chip_price_usd", "economics"),
        lifetime_years=figs.get(raw, "lifetime_years", "economics"),
    )


def _catalogue_files() -> dict[str, Any]:
    folder = resources.files("tokenmill.plan").joinpath("catalogue")
    return {f.name.removesuffix(".toml"): f for f in folder.iterdir() if f.name.endswith(".toml")}


@functools.cache
def _bundled(name: str) -> tuple[dict[str, Any], str]:
    """A bundled catalogue file, parsed once (searches place hundreds of plans)."""
    entry = _catalogue_files()[name]
    return tomllib.loads(entry.read_text(encoding="utf-8")), f"catalogue/{entry.name}"


def _load_raw(name: str) -> tuple[dict[str, Any], str]:
    if name == THIS_MACHINE and calibrated_path().exists():
        path = calibrated_path()
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    raw, origin = _bundled(name)
    return copy.deepcopy(raw), origin


def raw_entry(name: str) -> dict[str, Any]:
    """The parsed catalogue file of `name` (a copy)."""
    return _load_raw(name)[0]


def list_hardware() -> list[str]:
    return sorted(_catalogue_files())


def _aliases() -> dict[str, str]:
    table = {}
    for name in list_hardware():
        raw, _ = _load_raw(name)
        table[name] = name
        for alias in raw.get("aliases", ()):
            table[alias] = name
    return table


def get_hardware(name: str) -> HardwareSpec:
    """The catalogue entry called `name` (or one of its aliases)."""
    key = _aliases().get(name.strip().lower())
    if key is None:
        raise ConfigError(f"unknown hardware {name!r}; known: {', '.join(list_hardware())}")
    raw, origin = _load_raw(key)
    return spec_from_dict(raw, origin)
