"""The load generator against a real `tokenmill serve` (bundled model, real socket): a handful of
short requests, timed and counted the way `tokenmill bench serve` reports them."""

from __future__ import annotations

import json

from tests.server_fixtures import MODEL_NAME, REPO_ROOT, server_fixture
from tokenmill.bench import report
from tokenmill.bench.serve import ServeTarget, build_payload, first_model, run_load
from tokenmill.workload import SLO, ArrivalSpec, Workload, WorkloadRequest, build_workload

server = server_fixture("--max-num-seqs", "8")


def test_first_model_is_the_served_name(server):
    assert first_model(server.url()) == MODEL_NAME


def test_streamed_requests_are_timed_and_counted(server):
    workload = build_workload("fixed:in=12,out=6", 4)
    run = run_load(ServeTarget(server.url(), MODEL_NAME), workload, num_warmup=1, progress=False)
    assert [r.error for r in run.results] == [""] * 4
    for r in run.results:
        assert r.ok and r.usage_reported
        assert r.output_len == 6 == r.expected_output_len  # ignore_eos forced the length
        assert r.prompt_len == 12  # the server's own count of the token-id prompt
        assert 0 < r.ttft_s <= r.latency_s
        assert len(r.itl_s) == r.num_chunks - 1 and all(gap >= 0 for gap in r.itl_s)
        assert r.tpot_s is not None and r.tpot_s > 0
    m = report.summarize_run(run, SLO(e2e_s=600.0))
    assert m.num_completed == 4 and m.total_output_tokens == 24
    assert m.max_in_flight == 4  # all sent at once
    assert m.goodput == m.request_throughput


def test_max_concurrency_is_honoured_and_text_prompts_work(server):
    requests = tuple(WorkloadRequest(f"Say {word}.", 4, 3) for word in ("one", "two", "three"))
    workload = Workload(requests, max_concurrency=1)
    run = run_load(ServeTarget(server.url(), MODEL_NAME), workload, num_warmup=0, progress=False)
    assert all(r.ok and r.output_len == 3 for r in run.results)
    assert run.max_in_flight == 1
    starts = sorted(r.start_s for r in run.results)
    ends = sorted(r.start_s + r.latency_s for r in run.results)
    assert all(s >= e - 1e-3 for s, e in zip(starts[1:], ends[:-1], strict=True))  # one at a time


def test_chat_endpoint(server):
    requests = (WorkloadRequest("Hello there", 3, 4),)
    target = ServeTarget(server.url(), MODEL_NAME, endpoint="chat")
    run = run_load(target, Workload(requests), num_warmup=0, progress=False)
    assert run.results[0].ok and run.results[0].output_len == 4


def test_paced_arrivals_are_respected(server):
    workload = build_workload("fixed:in=4,out=2", 3, ArrivalSpec(rate=4.0))
    run = run_load(ServeTarget(server.url(), MODEL_NAME), workload, num_warmup=0, progress=False)
    for planned, r in zip(workload.requests, run.results, strict=True):
        assert r.ok and r.start_s >= planned.arrival_s - 0.01


def test_a_failed_request_is_recorded_not_raised(server):
    target = ServeTarget(server.url(), "no-such-model")
    run = run_load(target, build_workload("fixed:in=4,out=2", 1), num_warmup=0, progress=False)
    assert not run.results[0].ok and run.results[0].error.startswith("HTTP 404")


def test_payload_asks_for_usage_and_exact_lengths():
    payload = build_payload(ServeTarget("http://x", "m"), WorkloadRequest(None, 5, 7), 0)
    assert payload["max_tokens"] == 7 and payload["ignore_eos"] is True
    assert payload["stream_options"] == {"include_usage": True}
    assert len(payload["prompt"]) == 5


def test_cli_writes_json(server, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "serve.json"
    cmd = [sys.executable, "-m", "tokenmill.cli.main", "bench", "serve", "--base-url",
           server.url(), "--workload", "fixed:in=8,out=4", "--num-prompts", "3",
           "--slo", "ttft=60s", "--json", str(out), "--per-request", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "TTFT" in proc.stdout and "goodput" in proc.stdout
    data = json.loads(out.read_text())
    assert data["metrics"]["num_completed"] == 3
    assert data["metrics"]["total_output_tokens"] == 12
    assert len(data["requests"]) == 3 and "loadavg_1_5_15" in data["machine"]
