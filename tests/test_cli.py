"""The command line, run as users run it: `tokenmill generate` and `tokenmill chat`."""

from __future__ import annotations

import json
import subprocess
import sys

from tokenmill import SamplingParams

CLI = [sys.executable, "-m", "tokenmill.cli.main"]


def run_cli(
    *args: str, stdin: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_generate_prints_what_the_api_generates(llm_fp32):
    prompt = "The three primary colors are"
    expected = llm_fp32.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    proc = run_cli(
        "generate", prompt, "--dtype", "float32", "--temperature", "0", "--max-tokens", "12",
        "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["outputs"][0]["token_ids"] == expected.outputs[0].token_ids
    assert record["outputs"][0]["text"] == expected.outputs[0].text


def test_generate_reports_bad_input_without_a_traceback():
    proc = run_cli("generate", "hi", "--temperature", "-1")
    assert proc.returncode == 2
    assert "temperature" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("generate", "hi", "--model", "/nonexistent/model.gguf")
    assert proc.returncode == 2
    assert "/nonexistent/model.gguf" in proc.stderr and "Traceback" not in proc.stderr


def test_chat_streams_replies_and_keeps_the_conversation(llm_fp32):
    conversation = [{"role": "user", "content": "What is 2 + 2?"}]
    first = llm_fp32.chat(conversation, SamplingParams(max_tokens=16, temperature=0))[0]
    proc = run_cli(
        "chat", "--dtype", "float32", "--temperature", "0", "--max-tokens", "16",
        stdin="What is 2 + 2?\nAnd times three?\n/exit\n",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 2
    assert replies[0] == "assistant> " + first.outputs[0].text.split("\n")[0]
