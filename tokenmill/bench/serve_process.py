"""`tokenmill serve` in a subprocess on a free port: started, waited for until /health answers,
stopped with SIGTERM. Shared by `tokenmill bench compare` and `tokenmill plan validate`."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tokenmill.bench.machine_load import process_cpu_seconds
from tokenmill.errors import ConfigError

_BANNER = re.compile(r"serving '.*' on http://[^:]+:(\d+)")
START_TIMEOUT_S = 600


class ServeProcess:
    """`with ServeProcess(args, log_path) as server:` ... `server.base_url`. The server binds
    port 0 and prints the port it got; its output goes to `log_path`."""

    def __init__(self, serve_args: list[str], log_path: Path) -> None:
        self.cmd = [sys.executable, "-m", "tokenmill.cli.main", "serve", "--port", "0", *serve_args]
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.base_url = ""

    def __enter__(self) -> ServeProcess:
        import httpx

        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if self.proc.poll() is not None:
                raise ConfigError(f"tokenmill serve exited:\n{text[-2000:]}")
            match = _BANNER.search(text)
            if match:
                self.base_url = f"http://127.0.0.1:{match.group(1)}"
                try:
                    if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.25)
        self.__exit__()
        raise ConfigError(f"tokenmill serve did not become healthy in {START_TIMEOUT_S} s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cpu_seconds(self) -> float:
        """CPU-seconds the server process (and its waited children) has used."""
        return 0.0 if self.proc is None else process_cpu_seconds(self.proc.pid)

    def engine_counters(self) -> tuple[float, float, float, float]:
        """(engine steps, seconds inside LLMEngine.step(), of them in steps with prompt tokens,
        seconds of the engine loop's iterations that ran a step) so far, from /metrics."""
        import httpx

        return parse_engine_counters(httpx.get(self.base_url + "/metrics", timeout=10).text)


def parse_engine_counters(text: str) -> tuple[float, float, float, float]:
    values = []
    names = (
        "engine_steps",
        "engine_step_seconds",
        "engine_prompt_step_seconds",
        "engine_loop_seconds",
    )
    for name in names:
        name = f"tokenmill:{name}_total"
        match = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$", text, re.M)
        values.append(float(match.group(1)) if match else float("nan"))
    return values[0], values[1], values[2], values[3]
