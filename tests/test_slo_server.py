"""Latency promises through the real server and the official openai client: a request whose
targets the step-time predictor says cannot be met is refused at once with 429, Retry-After and
code slo_unattainable; one that can is served and counted as attained in /metrics; a promised
stream is handed out no faster than its planned TPOT over --slo-max-jitter."""

from __future__ import annotations

import time

import openai
import pytest

from tests.server_fixtures import MODEL_NAME, server_fixture

server = server_fixture(
    "--max-num-seqs", "4", "--kv-cache-memory", "0.25", "--dtype", "float32",
    "--slo", "ttft=60s,tpot=10s", "--slo-policy", "reject", "--slo-max-jitter", "50",
)  # fmt: skip
PACE_S = 10 * 0.85 / 50  # a promised stream's least mean gap: planned TPOT / --slo-max-jitter


@pytest.mark.parametrize("stream", [False, True])
def test_unattainable_ttft_gets_429_with_retry_after(server, stream):
    client = server.client()
    with pytest.raises(openai.RateLimitError) as err:
        # 1 microsecond to the first token: no step of a 135M model is that fast.
        client.completions.create(
            model=MODEL_NAME, prompt="Hello there", max_tokens=4, stream=stream,
            extra_body={"slo": {"ttft_ms": 0.001}},
        )  # fmt: skip
    assert err.value.status_code == 429
    assert err.value.code == "slo_unattainable"
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert err.value.body["param"] == "slo"


def test_attainable_requests_are_served_and_counted(server):
    client = server.client()
    before = server.metrics()
    served = client.completions.create(
        model=MODEL_NAME, prompt="Hello there", max_tokens=4, temperature=0,
        extra_body={"ignore_eos": True},  # the server's default: ttft 60 s, tpot 10 s
    )  # fmt: skip
    assert served.usage.completion_tokens == 4
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        extra_body={"slo": {"best_effort": True}, "ignore_eos": True},
    )  # fmt: skip
    assert chat.usage.completion_tokens == 3
    after = server.metrics()
    attained = f'tokenmill:slo_attained_total{{class="0",kind="ttft",model_name="{MODEL_NAME}"}}'
    assert after[attained] - before.get(attained, 0) == 1  # the best-effort one is not counted
    refused = f'tokenmill:slo_refused_total{{model_name="{MODEL_NAME}",reason="ttft"}}'
    assert after.get(refused, 0) == before.get(refused, 0)
    measured = (
        f'tokenmill:step_time_measured_seconds_total{{kind="decode",model_name="{MODEL_NAME}"}}'
    )
    assert after[measured] > 0
    # The promised request's first token is counted with the TTFT its admission predicted.
    ttft = {k: f'tokenmill:slo_ttft_{k}_total{{model_name="{MODEL_NAME}"}}'
            for k in ("predictions", "predicted_seconds", "measured_seconds")}  # fmt: skip
    delta = {k: after[name] - before.get(name, 0) for k, name in ttft.items()}
    assert delta["predictions"] == 1 and 0 < delta["measured_seconds"] < 60
    # ... and in the histogram of measured / predicted: one more request, in some bucket.
    ratio = f'tokenmill:slo_ttft_measured_over_predicted_count{{model_name="{MODEL_NAME}"}}'
    assert after[ratio] - before.get(ratio, 0) == 1
    inf = (
        f'tokenmill:slo_ttft_measured_over_predicted_bucket{{le="+Inf",model_name="{MODEL_NAME}"}}'
    )
    assert after[inf] == after[ratio]


def test_a_promised_stream_is_paced_and_a_best_effort_one_is_not(server):
    client = server.client()
    times = {}
    for name, extra in (("promised", {}), ("best effort", {"slo": {"best_effort": True}})):
        chunks = client.completions.create(
            model=MODEL_NAME, prompt="Count: 1, 2, 3,", max_tokens=6, temperature=0,
            stream=True, extra_body={**extra, "ignore_eos": True},  # promised: the default SLO
        )  # fmt: skip
        times[name] = [time.monotonic() for c in chunks if c.choices and c.choices[0].text]
    paced = times["promised"]
    # Six tokens, the first delivered at once: the fifth gap ends no sooner than 5 x PACE_S
    # after it (one token of slack, should two tokens share a text chunk).
    assert len(paced) >= 5 and paced[-1] - paced[0] >= 4 * PACE_S
    assert len(times["best effort"]) >= 5  # served (its timing is the machine's, not asserted)
