"""Dollars and joules per token of a simulated deployment.

The whole deployment (all replicas' chips) is paid per hour whether busy or not; the run's
throughput says how many tokens that hour buys. Input and output tokens split the cost by the
share of step time spent on each (a mixed step's time is split in proportion to how long its
prefill and decode parts take alone). Energy is rated power times time: an upper bound, since
chips rarely draw their full rating.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.plan.hardware import HardwareSpec
from tokenmill.plan.metrics import SimMetrics


@dataclass(frozen=True)
class Economics:
    num_chips: int
    hourly_usd: float
    cost_per_mtok_usd: float  # per million output tokens, the whole cost
    cost_per_mtok_input_usd: float  # per million input tokens, their share of the cost
    cost_per_mtok_output_usd: float  # per million output tokens, their share of the cost
    joules_per_token: float  # per output token, at rated power
    output_tok_s_per_chip: float
    output_tok_per_usd: float
    power_kw: float


def economics(
    metrics: SimMetrics,
    hw: HardwareSpec,
    num_chips: int,
    scale: float,
    prefill_share: float,
) -> Economics:
    """`metrics` are one replica's; the whole deployment carries `scale` times its traffic."""
    hourly = hw.economics.hourly_cost_usd() * num_chips
    out_per_hour = metrics.output_tok_s * scale * 3600
    in_per_hour = metrics.input_tok_s * scale * 3600
    power_kw = hw.economics.power_w * num_chips / 1000

    def per_million(cost: float, tokens: float) -> float:
        return cost / tokens * 1e6 if tokens > 0 else float("inf")

    total_out_s = metrics.output_tok_s * scale
    return Economics(
        num_chips=num_chips,
        hourly_usd=hourly,
        cost_per_mtok_usd=per_million(hourly, out_per_hour),
        cost_per_mtok_input_usd=per_million(hourly * prefill_share, in_per_hour),
        cost_per_mtok_output_usd=per_million(hourly * (1 - prefill_share), out_per_hour),
        joules_per_token=power_kw * 1000 / total_out_s if total_out_s > 0 else float("inf"),
        output_tok_s_per_chip=total_out_s / num_chips,
        output_tok_per_usd=out_per_hour / hourly if hourly > 0 else float("inf"),
        power_kw=power_kw,
    )
