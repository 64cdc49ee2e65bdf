"""A server with a latency policy learns this machine's step times before it serves: with a TTFT
under what the bundled default profile prices a full-budget prompt step at (2.4 s here) and no
TPOT to cut the chunk, an idle server must still promise and serve a short request (it refused
every one before engine/slo_calibrate.py: no step ran to correct the predictor)."""

from __future__ import annotations

from tests.server_fixtures import MODEL_NAME, server_fixture

server = server_fixture(
    "--max-num-seqs", "4", "--kv-cache-memory", "0.25", "--quantization", "gguf",
    "--max-num-batched-tokens", "512", "--slo", "ttft=2.5s", "--slo-policy", "reject",
)  # fmt: skip


def test_an_idle_server_promises_a_short_request_under_a_tight_ttft(server):
    client = server.client()  # max_retries=0: a 429 surfaces, it is not retried
    before = server.metrics()
    reply = client.completions.create(
        model=MODEL_NAME, prompt="Hello there", max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 4
    after = server.metrics()
    promised = f'tokenmill:slo_ttft_predictions_total{{model_name="{MODEL_NAME}"}}'
    assert after[promised] - before.get(promised, 0) == 1  # served with a promise
    # The calibration's own prompt step taught the predictor (and counts as a measured one).
    prompt_steps = (
        f'tokenmill:step_time_measured_seconds_total{{kind="prompt",model_name="{MODEL_NAME}"}}'
    )
    assert before[prompt_steps] > 0
