"""A real `tokenmill serve` subprocess with the bundled model, for the server tests.

    server = server_fixture("--max-queue", "2")     # in a test module: one server per module
    server = shared_server_fixture(*SHARED_ARGS)    # or one shared by the modules that can

    def test_x(server):
        server.client().completions.create(...)     # the official openai client
        httpx.post(server.url("/v1/completions"), json=...)

The server listens on a free port (--port 0) that it prints on its first line; the fixture waits
for /health and stops the server with SIGTERM (then SIGKILL) at teardown.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAME = "SmolLM2-135M-Instruct"
API_KEY = "test-key"
_BANNER = re.compile(r"on http://[^:]+:(\d+)")


class ServerProcess:
    """One `tokenmill serve` process; its combined output goes to a log file."""

    def __init__(self, *args: str, api_key: str | None = None) -> None:
        self.args = list(args)
        self.api_key = api_key
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            prefix="tokenmill-serve-", suffix=".log", delete=False
        )

    def start(self, timeout_s: float = 300.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "tokenmill.cli.main", "serve", "--port", "0", *self.args]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            if self.port is None:
                match = _BANNER.search(self.output())
                self.port = int(match.group(1)) if match else None
            if self.port is not None and self._healthy():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout_s}s:\n{self.output()}")

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url("/health"), timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(
            base_url=self.url("/v1"), api_key=self.api_key or "EMPTY", max_retries=0, **kwargs
        )

    def async_client(self, **kwargs):
        from openai import AsyncOpenAI

        return AsyncOpenAI(
            base_url=self.url("/v1"), api_key=self.api_key or "EMPTY", max_retries=0, **kwargs
        )

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {name{labels}: value} (and bare names, labels dropped)."""
        return parse_metrics(httpx.get(self.url("/metrics"), timeout=10.0).text)

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        self.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return self.proc.returncode


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
        bare = key.split("{", 1)[0]
        out[bare] = out.get(bare, 0.0) + float(value) if "{" in key else float(value)
    return out


def server_fixture(*args: str, api_key: str | None = None, scope: str = "module"):
    """A pytest fixture that starts one server for the module (or the scope given)."""

    @pytest.fixture(scope=scope)
    def server():
        proc = ServerProcess(*args, api_key=api_key).start()
        try:
            yield proc
        finally:
            code = proc.stop()
            if code not in (0, None):
                print(f"server exited with {code}; its output:\n{proc.output()}")

    return server


_SHARED: dict[tuple, ServerProcess] = {}
# float32: the shared server's tests compare replies in a batch with replies alone, which only
# float32 reproduces exactly (bfloat16 sums differ with the batch's shape, e.g. split-KV decode).
SHARED_ARGS = ("--max-num-seqs", "64", "--kv-cache-memory", "0.5", "--dtype", "float32")


def shared_server_fixture(*args: str):
    """Like server_fixture, but modules asking for the same flags share one server process,
    started on first use and stopped at the end of the session (each start costs a model load).
    """

    @pytest.fixture(scope="module")
    def server(request):
        proc = _SHARED.get(args)
        if proc is None or proc.proc.poll() is not None:
            proc = ServerProcess(*args).start()
            _SHARED[args] = proc
            request.config.add_cleanup(proc.stop)
        return proc

    return server


def wait_for(predicate, timeout_s: float = 20.0, interval_s: float = 0.05):
    """Poll until `predicate()` is truthy; returns its last value (falsy on timeout)."""
    deadline = time.monotonic() + timeout_s
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = predicate()
    return value
