"""Prometheus families of speculative decoding, named as vLLM names them:

    tokenmill:spec_decode_num_drafts_total              verify passes (a request with >= 1 draft)
    tokenmill:spec_decode_num_draft_tokens_total        draft tokens proposed and verified
    tokenmill:spec_decode_num_accepted_tokens_total     of those, accepted
    tokenmill:spec_decode_num_accepted_tokens_per_pos_total{position="0|1|..."}
    tokenmill:spec_decode_num_draft_tokens_per_pos_total{position}
    tokenmill:spec_decode_draft_seconds_total           proposing (a draft model's passes)
    tokenmill:spec_decode_verify_seconds_total          steps that verified drafts

Absent when the server runs without speculation.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily

from tokenmill.spec.acceptance import SpecCounters

PREFIX = "tokenmill:spec_decode_"


def spec_families(spec: SpecCounters | None, model_name: str):
    if spec is None:
        return
    totals = (
        ("num_drafts", "Verify passes: a request's drafts checked in one step.", spec.num_drafts),
        ("num_draft_tokens", "Draft tokens verified.", spec.num_draft_tokens),
        ("num_accepted_tokens", "Draft tokens accepted.", spec.num_accepted_tokens),
        ("draft_seconds", "Time spent proposing drafts.", spec.draft_time_s),
        ("verify_seconds", "Wall time of the steps that verified drafts.", spec.verify_time_s),
    )
    for name, doc, value in totals:
        family = CounterMetricFamily(f"{PREFIX}{name}", doc, labels=["model_name"])
        family.add_metric([model_name], value)
        yield family
    per_pos = (
        ("num_accepted_tokens_per_pos", "Draft tokens accepted, by draft position.",
         spec.accepted_per_pos),
        ("num_draft_tokens_per_pos", "Draft tokens verified, by draft position.",
         spec.drafted_per_pos),
    )  # fmt: skip
    for name, doc, counts in per_pos:
        family = CounterMetricFamily(f"{PREFIX}{name}", doc, labels=["model_name", "position"])
        for position, value in enumerate(counts):
            family.add_metric([model_name, str(position)], value)
        yield family
