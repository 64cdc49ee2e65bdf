"""Speculative decoding behind the server: the official openai client streams several accepted
tokens as one delta and gets the text it would get without speculation; /metrics carries the
spec_decode families; the planner reads its per-position acceptance from them."""

from __future__ import annotations

import json

import httpx

from tests.server_fixtures import MODEL_NAME, SHARED_ARGS, server_fixture, shared_server_fixture
from tokenmill.plan.spec_acceptance import conditional_acceptance, measured_acceptance

SPEC = json.dumps({"method": "ngram", "num_speculative_tokens": 4})
server = server_fixture(*SHARED_ARGS, "--speculative-config", SPEC)
plain_server = shared_server_fixture(*SHARED_ARGS)

TEXT = (
    "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n\n\n"
    "def sub(a, b):\n    return a - b\n"
)
MESSAGES = [{"role": "user", "content": f"Copy this code exactly:\n\n{TEXT}"}]


def _stream(srv) -> tuple[str, list[str]]:
    chunks = srv.client().chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=48, temperature=0, stream=True
    )
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    return "".join(deltas), deltas


def test_streamed_text_equals_no_speculation_and_metrics_count_drafts(server, plain_server):
    text, deltas = _stream(server)
    ref, ref_deltas = _stream(plain_server)
    assert text == ref
    assert len(deltas) < len(ref_deltas)  # accepted drafts arrive together
    metrics = server.metrics()
    drafted = metrics["tokenmill:spec_decode_num_draft_tokens_total"]
    accepted = metrics["tokenmill:spec_decode_num_accepted_tokens_total"]
    assert drafted > 0 and 0 < accepted <= drafted
    per_pos = metrics["tokenmill:spec_decode_num_draft_tokens_per_pos_total"]
    assert per_pos == drafted
    assert "tokenmill:spec_decode_num_drafts_total" not in plain_server.metrics()


def test_planner_reads_measured_acceptance(server):
    _stream(server)  # drafts to count, whether or not another test ran first
    rates = measured_acceptance(server.url("/metrics"))
    assert 1 <= len(rates) <= 4 and all(0 <= r <= 1 for r in rates)
    text = httpx.get(server.url("/metrics"), timeout=10).text
    assert "spec_decode_num_accepted_tokens_per_pos_total" in text


def test_conditional_acceptance_from_counts():
    # k = 2 fixed: 100 verifies; 80 accepted the first draft, 40 of those the second.
    assert conditional_acceptance([100, 100], [80, 40]) == (0.8, 0.5)
    assert conditional_acceptance([10, 10], [0, 0]) == (0.0,)
