"""Running untrusted generated code: one Python program per subprocess, isolated and timed.

The child (sandbox_child.py) limits its own resources, enters new user/mount/network
namespaces where the kernel allows (every mount read-only but its private temporary folder, no
network), and installs a Python-level guard against sockets, process creation and writes outside
that folder before it runs the program. The parent gives it an empty environment, a fresh temporary
folder as its working directory and as the place its output goes (so output is bounded by the
file-size limit), and kills its whole process group at the timeout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
MAX_OUTPUT_CHARS = 2000


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed" (exit 0) | "failed" | "timeout"
    returncode: int | None
    output: str  # the tail of stdout + stderr
    # How the child was isolated: "namespaces" (read-only filesystem but its folder, no
    # network), "network-namespace" (no network; writes refused by the Python guard only), or
    # "python-guard" (the Python-level guard alone).
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(program: str, timeout_s: float = 10.0, memory_bytes: int = 1 << 30) -> SandboxResult:
    """Run `program` as __main__ in a sandboxed child; passed means it exited with status 0."""
    workdir = tempfile.mkdtemp(prefix="tokenmill-sandbox-")
    try:
        program_path = os.path.join(workdir, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        out_path = os.path.join(workdir, ".output")
        with open(out_path, "wb") as out:
            returncode = _run_child(workdir, program_path, out, timeout_s, memory_bytes)
        output = Path(out_path).read_text(encoding="utf-8", errors="replace")[-MAX_OUTPUT_CHARS:]
        isolation_path = os.path.join(workdir, ".isolation")
        isolation = Path(isolation_path).read_text() if os.path.isfile(isolation_path) else "none"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    status = "timeout" if returncode is None else "passed" if returncode == 0 else "failed"
    return SandboxResult(status, returncode, output, isolation)


def _run_child(workdir, program_path, out, timeout_s: float, memory_bytes: int) -> int | None:
    cpu_seconds = max(1, int(timeout_s) + 1)
    command = [sys.executable, "-I", "-B", str(CHILD), workdir, program_path,
               str(cpu_seconds), str(memory_bytes)]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    proc = subprocess.Popen(
        command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    finally:
        # The whole group: whatever the program started dies with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
