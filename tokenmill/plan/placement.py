"""Placement: the fewest chips that hold a model's weights plus the KV cache of the target load.

A replica is `tp` chips wide (tensor parallel: every linear and the attention heads split across
them, two all-reduces per layer) and `pp` stages deep (pipeline parallel: contiguous layers per
stage, activations hop between stages). Stages are filled in order:

    stage 0: [embedding | layer 0 .. a-1]   stage 1: [layer a .. b-1]   ...   [.. | final norm, lm_head]

Tensor parallel stays inside the chips' scale-up domain (an NVLink node; one wafer; a Groq C2C
network). With more than one KV head per chip the cache splits by heads; beyond that, heads are
replicated. For each allowed width the greedy fill gives the fewest stages; the layout with the
fewest chips wins, ties going to the wider (fewer hops, less per-chip work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenmill.errors import ConfigError
from tokenmill.models.arch_config import ArchConfig
from tokenmill.perf.dtypes import Precision
from tokenmill.perf.kv_memory import kv_bytes_per_token, kv_bytes_per_token_per_layer
from tokenmill.perf.model import layer_weight_bytes, table_bytes, weight_bytes
from tokenmill.plan.hardware import HardwareSpec


class PlacementError(ConfigError):
    """The model and its KV cache do not fit the hardware as asked."""


@dataclass(frozen=True)
class Stage:
    num_layers: int
    has_embedding: bool
    has_head: bool
    weight_bytes_per_chip: float


@dataclass(frozen=True)
class Placement:
    tp: int
    pp: int
    replicas: int
    stages: tuple[Stage, ...]
    chip_capacity_bytes: float  # usable bytes per chip for weights + KV
    kv_capacity_tokens: int  # KV tokens one replica can hold
    explanation: str

    @property
    def chips_per_replica(self) -> int:
        return self.tp * self.pp

    @property
    def num_chips(self) -> int:
        return self.tp * self.pp * self.replicas


@dataclass(frozen=True)
class _Sizes:
    layer: float  # weights of one layer per chip
    embed: float
    head: float
    kv_token_layer: float  # KV bytes per token per layer per chip


def _sizes(arch: ArchConfig, p: Precision, tp: int) -> _Sizes:
    kv = kv_bytes_per_token_per_layer(arch, p.kv, tp)
    table = table_bytes(arch, p) / tp
    return _Sizes(
        layer_weight_bytes(arch, p) / tp, table, table + arch.hidden_size * p.act_bytes, kv
    )


def tp_candidates(arch: ArchConfig, hw: HardwareSpec) -> list[int]:
    """Widths that split the heads evenly and fit in one scale-up domain."""
    nh, nkv = arch.num_attention_heads, arch.num_key_value_heads
    limit = max(1, hw.scale_up.domain_size)
    return [
        t for t in range(1, min(nh, limit) + 1) if nh % t == 0 and (nkv % t == 0 or t % nkv == 0)
    ]


def _pack(arch: ArchConfig, s: _Sizes, cap: float, kv_tokens: int) -> list[Stage] | None:
    """Greedy in-order fill, which gives the fewest stages; None when a unit alone does not fit
    one chip."""
    kv_per_layer = s.kv_token_layer * kv_tokens

    def fits(w: float, n: int) -> bool:
        return w + n * kv_per_layer <= cap

    stages: list[Stage] = []
    w, n, embed = s.embed, 0, True
    if not fits(w, 0):
        return None
    for _ in range(arch.num_hidden_layers):
        if not fits(w + s.layer, n + 1):
            stages.append(Stage(n, embed, False, w))
            w, n, embed = 0.0, 0, False
            if not fits(s.layer, 1):
                return None
        w, n = w + s.layer, n + 1
    # Tied embeddings: one table serves both ends when they share a stage.
    head = s.head - s.embed if arch.tie_word_embeddings and not stages else s.head
    if not fits(w + head, n):
        stages.append(Stage(n, embed, False, w))
        w, n, embed, head = 0.0, 0, False, s.head
        if not fits(head, 0):
            return None
    stages.append(Stage(n, embed, True, w + head))
    return stages


def _even(arch: ArchConfig, s: _Sizes, pp: int) -> list[Stage]:
    """`pp` stages with layers spread as evenly as possible (embedding first, head last)."""
    L = arch.num_hidden_layers
    counts = [L // pp + (i < L % pp) for i in range(pp)]
    stages = []
    for i, n in enumerate(counts):
        w = n * s.layer + (s.embed if i == 0 else 0.0) + (s.head if i == pp - 1 else 0.0)
        if arch.tie_word_embeddings and pp == 1:
            w -= s.embed
        stages.append(Stage(n, i == 0, i == pp - 1, w))
    return stages


def _split(stages: list[Stage], s: _Sizes, pp: int) -> list[Stage]:
    """Halve the stage with the most layers until there are `pp`; no chip gets fuller."""
    stages = list(stages)
    while len(stages) < pp:
        idx = max(range(len(stages)), key=lambda i: stages[i].num_layers)
        st = stages[idx]
        a = st.num_layers // 2
        b = st.num_layers - a
        first = Stage(a, st.has_embedding, False, a * s.layer + s.embed * st.has_embedding)
        second = Stage(b, False, st.has_head, b * s.layer + s.head * st.has_head)
        stages[idx : idx + 1] = [first, second]
    return stages


def _kv_capacity(stages: list[Stage], s: _Sizes, cap: float) -> int:
    caps = [
        (cap - st.weight_bytes_per_chip) / (s.kv_token_layer * st.num_layers)
        for st in stages
        if st.num_layers
    ]
    return max(0, int(min(caps)))


def _balanced(
    arch: ArchConfig, s: _Sizes, cap: float, kv_tokens: int, greedy: list[Stage], pp: int
) -> list[Stage]:
    """Even layer counts over `pp` stages when they fit, else the greedy fill split to `pp`."""
    even = _even(arch, s, pp)
    kv_per_layer = s.kv_token_layer * kv_tokens
    if all(st.weight_bytes_per_chip + kv_per_layer * st.num_layers <= cap for st in even):
        return even
    return _split(greedy, s, pp)


def fewest_stages(
    arch: ArchConfig, hw: HardwareSpec, p: Precision, kv_tokens: int, tp: int
) -> int | None:
    """Pipeline stages a `tp`-wide replica needs to hold the weights and `kv_tokens` of KV."""
    stages = _pack(arch, _sizes(arch, p, tp), hw.profile.state_capacity_bytes(), kv_tokens)
    return None if stages is None else len(stages)


def _layout(
    arch: ArchConfig,
    hw: HardwareSpec,
    p: Precision,
    kv_tokens: int,
    tp: int | None,
    chips: int | None,
) -> tuple[int, list[Stage], _Sizes] | None:
    cap = hw.profile.state_capacity_bytes()
    best = None
    widths = [tp] if tp else tp_candidates(arch, hw)
    for t in widths:
        s = _sizes(arch, p, t)
        stages = _pack(arch, s, cap, kv_tokens)
        if stages is None:
            continue
        pp = len(stages)
        if chips is not None:
            if chips % t or chips // t < pp or chips // t > arch.num_hidden_layers:
                continue
            pp = chips // t
        key = (t * pp, -t)
        if best is None or key < best[0]:
            best = (key, t, _balanced(arch, s, cap, kv_tokens, stages, pp), s)
    return None if best is None else best[1:]


def place(
    arch: ArchConfig,
    hw: HardwareSpec,
    precision: Precision,
    kv_target_tokens: int,
    chips: int | None = None,
    tp: int | None = None,
    replicas: int = 1,
    model_name: str = "model",
    min_kv_tokens: int | None = None,
) -> Placement:
    """Fewest chips per replica holding the weights and `kv_target_tokens` of KV cache (or the
    best layout on exactly `chips` chips, or with tensor-parallel width `tp`).

    With `chips` fixed and `min_kv_tokens` (one longest request) given, memory is fixed: the KV
    cache gets what the weights leave, at least `min_kv_tokens`, and the engine queues what does
    not fit; only weights plus one request that do not fit are refused."""
    if replicas < 1 or (chips is not None and chips < 1) or (tp is not None and tp < 1):
        raise ConfigError("chips, tp and replicas must be >= 1")
    if tp is not None and tp not in tp_candidates(arch, hw) and tp != 1:
        raise PlacementError(
            f"tp={tp} does not split {arch.num_attention_heads} heads / "
            f"{arch.num_key_value_heads} KV heads within {hw.name}'s domain of "
            f"{hw.scale_up.domain_size}; valid: {tp_candidates(arch, hw)}"
        )
    found = _layout(arch, hw, precision, kv_target_tokens, tp, chips)
    unit = hw.deployment_unit
    if found is not None and chips is None and tp is None and unit > 1:
        # The vendor's deployment: whole nodes, the chips of the last one used too.
        num = found[0] * len(found[1])
        whole = _layout(arch, hw, precision, kv_target_tokens, None, math.ceil(num / unit) * unit)
        found = whole or found
    if found is None and chips is not None and min_kv_tokens is not None:
        kv_target_tokens = min(kv_target_tokens, min_kv_tokens)
        found = _layout(arch, hw, precision, kv_target_tokens, tp, chips)
    if found is None:
        raise PlacementError(_shortfall(arch, hw, precision, kv_target_tokens, chips, model_name))
    t, stages, sizes = found
    cap = hw.profile.state_capacity_bytes()
    placement = Placement(
        tp=t,
        pp=len(stages),
        replicas=replicas,
        stages=tuple(stages),
        chip_capacity_bytes=cap,
        kv_capacity_tokens=_kv_capacity(stages, sizes, cap),
        explanation="",
    )
    text = explain(arch, hw, precision, kv_target_tokens, placement, model_name, chips)
    return Placement(**{**placement.__dict__, "explanation": text})


def _shortfall(
    arch: ArchConfig, hw: HardwareSpec, p: Precision, kv_tokens: int, chips: int | None, name: str
) -> str:
    cap = hw.profile.state_capacity_bytes()
    need = weight_bytes(arch, p) + kv_tokens * kv_bytes_per_token(arch, p.kv)
    what = (
        f"{name} ({p.weights} weights) with KV for {kv_tokens:,} tokens needs {need / 1e9:,.1f} GB"
    )
    if chips is None:
        return f"{what}; no layout of {hw.name} chips within its link domain holds it"
    have = chips * cap
    if have < need:
        return (
            f"{what}; {chips} x {hw.name} hold {have / 1e9:,.1f} GB usable: short by "
            f"{(need - have) / 1e9:,.1f} GB (at least {math.ceil(need / cap)} chips)"
        )
    return (
        f"{what}; {chips} x {hw.name} hold {have / 1e9:,.1f} GB in total, but no split of "
        f"{arch.num_hidden_layers} layers and {arch.num_attention_heads} heads over {chips} chips "
        "fits each chip; try a different --chips"
    )


def explain(
    arch: ArchConfig,
    hw: HardwareSpec,
    p: Precision,
    kv_tokens: int,
    pl: Placement,
    name: str,
    chips: int | None,
) -> str:
    w = weight_bytes(arch, p) / 1e9
    kv = kv_tokens * kv_bytes_per_token(arch, p.kv)
    cap = pl.chip_capacity_bytes / 1e9
    how = "as asked" if chips else "the fewest that fit"
    if not chips and hw.deployment_unit > 1:
        how += f", in whole {hw.deployment_unit}-chip nodes"
    parts = [
        f"{name}: {w:,.1f} GB of weights ({p.weights}) + {kv / 1e9:,.1f} GB KV ({p.kv}) "
        f"for {kv_tokens:,} tokens.",
        f"One {hw.name} holds {cap:,.2f} GB usable "
        f"({hw.profile.usable_memory_fraction:.0%} of {hw.profile.tier_for('weights').name}).",
        f"{pl.chips_per_replica} chip{'s' * (pl.chips_per_replica > 1)} per replica ({how}): "
        f"TP {pl.tp} x PP {pl.pp}",
    ]
    if pl.pp > 1:
        per_stage = sorted({s.num_layers for s in pl.stages})
        parts[-1] += f", {'/'.join(map(str, per_stage))} layers per stage"
        link = "scale-up" if pl.chips_per_replica <= hw.scale_up.domain_size else "scale-out"
        parts[-1] += f", stages linked over {link}"
    parts[-1] += "."
    if pl.replicas > 1:
        parts.append(f"{pl.replicas} replicas share the load: {pl.num_chips} chips in all.")
    parts.append(f"Room for {pl.kv_capacity_tokens:,} KV tokens per replica.")
    return " ".join(parts)
