"""The native kernels as a library: three modes give the same greedy text, a killed build's
locks do not hang the next start, a read-only home falls back, the server says it is starting.

The variants run in subprocesses (TOKENMILL_NATIVE is read once per process). Both variants
are built ahead by `make test`; a build folder copied without its module makes "a build is
needed" cheap to stage (ninja then only links, ~1 s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tokenmill.native import build

REPO_ROOT = Path(__file__).resolve().parents[1]

_GREEDY = """
import json
from tokenmill import LLM, SamplingParams
from tokenmill.native import kernels
prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]
params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
out = {"isa": kernels().isa() if kernels() else None}
for dtype in ("float32", "bfloat16"):
    llm = LLM(dtype=dtype, kv_cache_memory_gib=0.05, max_num_batched_tokens=64, max_model_len=256)
    out[dtype] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
print(json.dumps(out))
"""


def _run_python(code: str, timeout_s: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env={**os.environ, **env},
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip


def _stage_link_only_build(home: Path, name: str) -> Path:
    """Under `home`, the build folder of variant `name` without its module: needs a build."""
    v = build.variant(name)
    built = build.library_path(v) or build.build(v)  # built already by `make test`
    folder = home / "torch_extensions" / built.parent.name
    shutil.copytree(built.parent, folder, ignore=shutil.ignore_patterns("*.so", "*lock"))
    return folder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_the_three_modes_give_the_same_greedy_tokens():
    # Side by side: loading the model is mostly one thread's work.
    procs = {
        mode: subprocess.Popen(
            [sys.executable, "-c", _GREEDY],
            cwd=REPO_ROOT,
            text=True,
            env={**os.environ, "TOKENMILL_NATIVE": mode},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for mode in ("native", "portable", "0")
    }
    runs = {}
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        runs[mode] = json.loads(stdout.strip().splitlines()[-1])
    assert runs["0"]["isa"] is None
    assert runs["portable"]["isa"] in ("avx2", "neon", "generic")
    for mode in ("portable", "0"):
        for dtype in ("float32", "bfloat16"):
            assert runs[mode][dtype] == runs["native"][dtype], (mode, dtype)


def test_a_stale_lock_file_and_torch_lock_do_not_hang_the_build(tmp_path):
    folder = _stage_link_only_build(tmp_path, "portable")
    (folder / "tokenmill.lock").write_text(f"{_dead_pid()}\n")
    (folder / "lock").touch()  # torch's baton, left by a killed build: it would wait forever
    done = _run_python(
        "from tokenmill.native import kernels; print(kernels().isa())",
        timeout_s=120, TOKENMILL_HOME=str(tmp_path), TOKENMILL_NATIVE="portable",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "removing stale lock" in done.stderr and "stale build lock" in done.stderr
    assert not (folder / "tokenmill.lock").exists() and not (folder / "lock").exists()
    assert (folder / "tokenmill_native_portable.so").is_file()


def test_a_live_lock_is_waited_for_then_times_out_naming_the_lock(tmp_path):
    from tokenmill.native.lock import LockTimeoutError, PidLock

    path = tmp_path / "tokenmill.lock"
    path.write_text(f"{os.getppid()}\n")  # a live process that is not us
    start = time.monotonic()
    with pytest.raises(LockTimeoutError, match=re.escape(str(path))), PidLock(path, 0.6, 0.1):
        pass
    assert time.monotonic() - start < 5
    assert path.read_text() == f"{os.getppid()}\n"  # a live owner's lock is left alone


def test_a_read_only_home_falls_back_with_a_warning(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: a home below a plain file cannot be created
        (tmp_path / "file").touch()
        home = tmp_path / "file" / "home"
    temp = tmp_path / "tmp"
    _stage_link_only_build(temp / f"tokenmill-{os.getuid()}", "portable")
    done = _run_python(
        "from tokenmill.native import kernels; print(kernels().isa())",
        timeout_s=120, TOKENMILL_HOME=str(home), TOKENMILL_NATIVE="portable", TMPDIR=str(temp),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "is not writable" in done.stderr and str(temp) in done.stderr
    assert done.stdout.strip() in ("avx2", "neon", "generic")


def test_native_off_and_unknown_values(monkeypatch):
    from tokenmill import env, native
    from tokenmill.errors import ConfigError

    monkeypatch.setenv("TOKENMILL_NATIVE", "0")
    assert native.selected_variant() is None and not native.needs_build()
    assert native.kernels() is None
    monkeypatch.setenv("TOKENMILL_NATIVE", "avx9000")
    with pytest.raises(ConfigError, match="TOKENMILL_NATIVE"):
        env.native_mode()


@pytest.mark.slow
def test_server_answers_starting_while_the_kernels_build(tmp_path):
    """A server whose kernels must be built listens at once: /health 503 "starting", the API
    503 server_starting, until the build (held here by our lock, then left stale) ends."""
    folder = _stage_link_only_build(tmp_path, "portable")
    lock = folder / "tokenmill.lock"
    lock.write_text(f"{os.getpid()}\n")  # we hold the build: the server must wait
    log = (tmp_path / "serve.log").open("w")
    env = {**os.environ, "TOKENMILL_HOME": str(tmp_path), "TOKENMILL_NATIVE": "portable"}
    cmd = [sys.executable, "-m", "tokenmill.cli.main", "serve", "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = _wait_for_banner(proc, tmp_path / "serve.log")
        health = _get_when_listening(url + "/health")
        assert health.status_code == 503 and health.json() == {"status": "starting"}
        models = httpx.get(url + "/v1/models", timeout=10)
        assert models.status_code == 503
        assert models.json()["error"]["code"] == "server_starting"
        output = (tmp_path / "serve.log").read_text()
        assert "compiling native kernels, one-time" in output
        lock.write_text(f"{_dead_pid()}\n")  # our build "was killed": the server takes over
        deadline = time.monotonic() + 120
        while httpx.get(url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, (tmp_path / "serve.log").read_text()
        log.close()


def _wait_for_banner(proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        match = re.search(r"on http://[^:]+:(\d+)", log.read_text())
        if match:
            return f"http://127.0.0.1:{match.group(1)}"
        time.sleep(0.1)
    raise AssertionError(f"no banner after {timeout_s} s:\n{log.read_text()}")


def _get_when_listening(url: str, timeout_s: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(url, timeout=10)
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
