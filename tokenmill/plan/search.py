"""Searches over deployments: the best use of a chip budget, and the cheapest deployment that
meets an SLO at an offered load.

A design is a replica's layout, `tp` chips wide and `pp` stages deep. For each width the
candidates are the fewest stages that hold the weights and one longest request, and twice as
many (more room for KV, shorter stages).

Chip budget (`--chips N` per replica): every design that fits N chips, plus N chips as one
pipeline per width; the chips a design leaves over serve as copies of it (data parallel). The
most throughput wins (those meeting the SLO first; at a rate every deployment that keeps up
produces the same, so then the faster per user). A larger budget's candidates include every
smaller one's layouts with at least as many copies, so more chips never give less.

Sizing (`--size`): per design, the fewest replicas that meet the SLO at the offered load. Below
`capacity_bound` replicas the load cannot be served (no replica decodes more than a full batch
per step); at `floor_bound` every replica holds about one request, so latencies are the
design's floor: a design that misses there misses at any count and is dropped. Between the two
the count is bisected. Designs are ranked by $ per million output tokens, then joules per token.
There is no cap on the chips searched.

Under latency promises (`slo_policy`), a refused request counts as missing the SLO, so a count
meets it when at least the SLO's percentile of all requests offered are served within every
target (goodput >= pct x the offered rate). Refusals shed load, so a count that refuses is not
overloaded: the search goes on doubling while the refused share falls.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.errors import ConfigError
from tokenmill.perf.step_cost import BatchShape
from tokenmill.plan.hardware import get_hardware
from tokenmill.plan.models import get_model
from tokenmill.plan.placement import fewest_stages, place, tp_candidates
from tokenmill.plan.planner import PlanRequest, PlanResult, run_plan
from tokenmill.plan.step_time import LayoutStepTime
from tokenmill.workload.types import Workload

Design = tuple[int, int]  # (tp, pp)


def designs(req: PlanRequest, sample: Workload, budget: int | None = None) -> list[Design]:
    """Candidate layouts of one replica of `req`'s model on its hardware (within `budget`)."""
    model, hw = get_model(req.model), get_hardware(req.hardware)
    num_layers = model.arch.num_hidden_layers
    found: list[Design] = []
    for t in [req.tp] if req.tp else tp_candidates(model.arch, hw):
        pp0 = fewest_stages(model.arch, hw, req.precision, sample.max_seq_len, t)
        if pp0 is None:
            continue
        depths = {pp0, 2 * pp0 if pp0 > 1 else pp0} | ({budget // t} if budget else set())
        limit = min(num_layers, budget // t if budget else num_layers)
        found += [(t, pp) for pp in sorted(depths) if pp0 <= pp <= limit]
    return found


def _rank_key(r: PlanResult) -> tuple:
    m = r.metrics
    thr = 0.0 if m.offered_tok_s is not None and not m.is_overloaded else -r.output_tok_s
    return (m.meets_slo is False, m.is_overloaded, thr, -m.per_user_tok_s, r.placement.num_chips)


def best_on_chips(
    req: PlanRequest, sample: Workload, run: Callable[[PlanRequest], PlanResult] | None = None
) -> tuple[PlanResult, list[PlanResult]]:
    """The best deployment of `req.chips` chips per replica; every configuration tried."""
    run = run or (lambda r: run_plan(r, sample=sample))
    tried = []
    for t, pp in designs(req, sample, req.chips):
        copies = req.chips // (t * pp)
        cand = dataclasses.replace(req, chips=t * pp, tp=t, replicas=req.replicas * copies)
        tried.append(run(cand))
    if not tried:
        return run(req), []  # raises the placement's own error
    best = min(tried, key=_rank_key)
    used = best.placement.num_chips
    note = (
        f"{req.chips * req.replicas} chips: the best of {len(tried)} ways to use them "
        f"(layouts x copies) is {best.placement.replicas} x TP{best.placement.tp} x "
        f"PP{best.placement.pp}" + (f", {used} chips used" if used < req.chips else "")
    )
    return dataclasses.replace(best, notes=(note, *best.notes)), tried


@dataclass(frozen=True)
class Sizing:
    best: PlanResult | None  # cheapest meeting the SLO
    per_design: tuple[PlanResult, ...]  # each design's fewest replicas meeting it, ranked
    tried: tuple[PlanResult, ...]
    notes: tuple[str, ...]


def _bounds(req: PlanRequest, sample: Workload) -> tuple[int, int]:
    """(replicas below which the load cannot be served, replicas at which each holds ~1)."""
    model, hw = get_model(req.model), get_hardware(req.hardware)
    n = len(sample.requests)
    mean_in = sum(r.prompt_len for r in sample.requests) / n
    mean_out = sample.mean_seq_len - mean_in
    if req.rate is None:
        return 1, req.concurrency
    longest = sample.max_seq_len
    pl = place(model.arch, hw, req.precision, longest, req.chips, req.tp, min_kv_tokens=longest)
    step = LayoutStepTime(model.arch, hw, req.precision, pl)
    ctx = int(mean_in + mean_out / 2)
    cap = max(1, min(req.max_num_seqs, pl.kv_capacity_tokens // math.ceil(sample.mean_seq_len)))
    full = step.seconds(BatchShape(cap, cap, cap * (ctx + 1), cap * (ctx + 1), cap))
    one = step.seconds(BatchShape(1, 1, ctx + 1, ctx + 1, 1))
    prefill = step.seconds(BatchShape.from_requests([(math.ceil(mean_in), 0, 1)]))
    low = math.ceil(req.rate * mean_out * full / cap)
    floor = math.ceil(req.rate * (prefill + mean_out * one))
    return max(1, low), max(1, low, floor)


def fewest_replicas(
    req: PlanRequest, sample: Workload, run: Callable[[PlanRequest], PlanResult]
) -> tuple[PlanResult | None, list[PlanResult]]:
    """The fewest replicas of `req`'s design meeting its SLO (None if even the floor misses)."""
    low, high = _bounds(req, sample)
    tried = []

    def at(replicas: int) -> PlanResult:
        tried.append(run(dataclasses.replace(req, replicas=replicas)))
        return tried[-1]

    best, before = at(low), None
    if best.metrics.meets_slo:
        return best, tried
    if high > low:
        before, best = best, at(high)
    while not best.metrics.meets_slo and _more_may_help(best, before):
        if high >= (req.concurrency or math.inf) or len(tried) > 40:
            return None, tried
        low, high = high + 1, 2 * high
        before, best = best, at(high)
    if not best.metrics.meets_slo:
        return None, tried
    lo = low - 1  # fails (or is the empty deployment)
    while high - lo > 1:
        mid = (lo + high) // 2
        r = at(mid)
        if r.metrics.meets_slo:
            high, best = mid, r
        else:
            lo = mid
    return best, tried


def _more_may_help(r: PlanResult, fewer: PlanResult | None) -> bool:
    """Whether more replicas than `r`'s, which misses, may meet the SLO: it is overloaded, a
    closed loop's users are split further, or under latency promises it refuses requests, fewer
    than with `fewer` replicas (refusals that do not fall with the load are the design's own)."""
    m = r.metrics
    if m.is_overloaded or r.request.rate is None:
        return True
    if not m.num_refused:
        return False
    return fewer is None or m.refused_share < fewer.metrics.refused_share


def size(req: PlanRequest, sample: Workload) -> Sizing:
    """The cheapest deployment of `req`'s model on its hardware meeting `req.slo`."""
    if req.slo is None:
        raise ConfigError("--size needs an --slo to meet")
    cache: dict[PlanRequest, PlanResult] = {}

    def run(r: PlanRequest) -> PlanResult:
        if r not in cache:
            cache[r] = run_plan(r, sample=sample)
        return cache[r]

    met, notes = [], []
    for t, pp in designs(req, sample):
        design = dataclasses.replace(req, chips=t * pp, tp=t, replicas=1)
        found, _ = fewest_replicas(design, sample, run)
        if found is None:
            notes.append(f"TP{t} x PP{pp} misses the SLO at any replica count")
        else:
            met.append(found)
    met.sort(key=lambda r: (r.economics.cost_per_mtok_usd, r.economics.joules_per_token))
    return Sizing(met[0] if met else None, tuple(met), tuple(cache.values()), tuple(notes))
