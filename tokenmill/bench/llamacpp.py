"""llama.cpp as a benchmark peer: its own C++ server (`llama-server`) and `llama-bench`.

The binaries are built with cmake from the llama.cpp source that the `llama-cpp-python` source
distribution vendors (vendor/llama.cpp), so no prebuilt binary is fetched; the wrapper's Python
server serializes requests and is no fair peer. A build is cached under
~/.cache/tokenmill/llama.cpp/<version>/ and reused by later runs:

    build = ensure_built()                       # minutes the first time, instant afterwards
    with LlamaServer(build, gguf, parallel=32, ctx_per_slot=2048) as server:
        server.base_url                          # an OpenAI-compatible endpoint
    llama_bench(build, gguf, n_prompt=512, n_gen=128)
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tokenmill.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_ROOT = Path.home() / ".cache" / "tokenmill" / "llama.cpp"
TARGETS = ("llama-server", "llama-bench", "llama-quantize", "llama-perplexity")
_DONE = "build.json"  # written last: its presence marks a complete build
# GGML_NATIVE: the binaries use every instruction set of this CPU (AVX-512, BF16), as torch does
# -- except AMX: a VM may list amx_* in /proc/cpuinfo without granting the tile state, and a
# native build then dies with SIGILL (seen here: Sapphire Rapids guest); tokenmill's kernels
# do not use AMX either. No web UI, no HTTPS, no downloads: the server only answers the API.
_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    f"-DCMAKE_C_FLAGS_RELEASE=-O3 -DNDEBUG {_NO_AMX}",
    f"-DCMAKE_CXX_FLAGS_RELEASE=-O3 -DNDEBUG {_NO_AMX}",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
)


@dataclass(frozen=True)
class LlamaCppBuild:
    version: str  # of the llama-cpp-python sdist the source came from
    bin_dir: Path

    def binary(self, name: str) -> Path:
        """The path of a tool; one in TARGETS that an older cached build lacks is built now
        (incrementally, from the same build folder)."""
        path = self.bin_dir / name
        if not path.is_file() and name in TARGETS:
            build = ["cmake", "--build", str(self.bin_dir.parent), "-j", "2", "--target", name]
            subprocess.run(build, check=True)
        if not path.is_file():
            raise ConfigError(f"llama.cpp build at {self.bin_dir} has no {name}")
        return path


def cached_builds(cache_root: Path = CACHE_ROOT) -> list[LlamaCppBuild]:
    """Complete builds in the cache, newest version last."""
    builds = []
    for marker in cache_root.glob(f"*/{_DONE}"):
        info = json.loads(marker.read_text())
        builds.append(LlamaCppBuild(info["version"], Path(info["bin_dir"])))
    return sorted(builds, key=lambda b: tuple(int(p) for p in b.version.split(".") if p.isdigit()))


def ensure_built(
    version: str | None = None, cache_root: Path = CACHE_ROOT, jobs: int = 2
) -> LlamaCppBuild:
    """A build of `version` (None: the newest cached one, else the newest on PyPI)."""
    cached = {b.version: b for b in cached_builds(cache_root)}
    if version in cached:
        return cached[version]
    if version is None and cached:
        return list(cached.values())[-1]
    with tempfile.TemporaryDirectory(prefix="tokenmill-llamacpp-") as tmp:
        sdist = _download_sdist(version, Path(tmp))
        version = sdist.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
        if version in cached:
            return cached[version]
        root = cache_root / version
        src = _extract_vendored_source(sdist, root)
    return _build(version, src, root / "build", jobs)


def _download_sdist(version: str | None, dest: Path) -> Path:
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
           "-q", "-d", str(dest), spec]  # fmt: skip
    log.info("downloading the %s source distribution", spec)
    subprocess.run(cmd, check=True)
    found = glob.glob(str(dest / "llama_cpp_python-*.tar.gz"))
    if len(found) != 1:
        raise ConfigError(f"pip download of {spec} gave {found}, expected one sdist")
    return Path(found[0])


def _extract_vendored_source(sdist: Path, root: Path) -> Path:
    """Unpack only vendor/llama.cpp of the sdist into root/src."""
    src = root / "src"
    if src.exists():
        shutil.rmtree(src)
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        members = []
        for member in tar.getmembers():
            if member.name.startswith(prefix):
                member.name = member.name[len(prefix) :]
                members.append(member)
        if not members:
            raise ConfigError(f"{sdist.name} carries no vendor/llama.cpp")
        tar.extractall(src, members=members, filter="data")
    return src


def _build(version: str, src: Path, build_dir: Path, jobs: int) -> LlamaCppBuild:
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(src), "-B", str(build_dir), *generator, *CMAKE_OPTIONS]
    log.info("configuring llama.cpp %s: %s", version, " ".join(configure))
    subprocess.run(configure, check=True)
    started = time.monotonic()
    build = ["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TARGETS]
    subprocess.run(build, check=True)
    bin_dir = build_dir / "bin"
    info = {
        "version": version,
        "bin_dir": str(bin_dir),
        "cmake_options": list(CMAKE_OPTIONS),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (build_dir.parent / _DONE).write_text(json.dumps(info, indent=2))
    return LlamaCppBuild(version, bin_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`llama-server` on a free loopback port, with `parallel` slots and continuous batching.

    KV cache: by default `ctx_per_slot` tokens per slot (llama-server splits its -c context evenly
    across the slots, so -c is parallel * ctx_per_slot). With `kv_tokens`, one unified pool of that
    many tokens that all slots share (--kv-unified), as tokenmill's block pool is shared.
    """

    def __init__(
        self,
        build: LlamaCppBuild,
        model: str | os.PathLike,
        parallel: int = 1,
        ctx_per_slot: int = 2048,
        threads: int | None = None,
        batch_size: int = 2048,
        ubatch_size: int = 512,
        kv_tokens: int | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.threads = threads or os.cpu_count() or 1
        self.cmd = [
            str(build.binary("llama-server")), "-m", str(model),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--parallel", str(parallel),
            "--cont-batching", "-t", str(self.threads), "-tb", str(self.threads),
            "-b", str(batch_size), "-ub", str(ubatch_size), "--no-webui",
        ]  # fmt: skip
        if kv_tokens:
            self.cmd += ["-c", str(kv_tokens), "--kv-unified"]
        else:
            self.cmd += ["-c", str(parallel * ctx_per_slot), "--no-kv-unified"]
        self.cmd += list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            prefix="llama-server-", suffix=".log", delete=False
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> LlamaServer:
        import httpx

        log.info("starting %s", " ".join(self.cmd))
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"llama-server exited with {self.proc.returncode}:\n{self.output()}"
                )
            try:
                # /health answers 503 while the model loads and 200 once it serves.
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"llama-server not healthy after {timeout_s}s:\n{self.output()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.close()
        os.unlink(self.log.name)


def llama_bench(
    build: LlamaCppBuild,
    model: str | os.PathLike,
    n_prompt: int = 512,
    n_gen: int = 128,
    repetitions: int = 5,
    threads: int | None = None,
) -> list[dict]:
    """llama-bench's own records (JSON): one for prefill (pp n_prompt) and one for decode
    (tg n_gen), each with avg_ts / stddev_ts in tokens per second over `repetitions`."""
    threads = threads or os.cpu_count() or 1
    cmd = [str(build.binary("llama-bench")), "-m", str(model), "-p", str(n_prompt),
           "-n", str(n_gen), "-r", str(repetitions), "-t", str(threads), "-o", "json"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def to_bf16_gguf(
    build: LlamaCppBuild, src: str | os.PathLike, dst: str | os.PathLike | None = None
) -> Path:
    """A BF16 copy of a (quantized) GGUF, made with llama-quantize --allow-requantize.

    The quantized weights are dequantized to float32 and rounded to bfloat16, the same rounding
    that loading the quantized GGUF with dtype=bfloat16 applies. The copy is not bit-for-bit the
    quantized model: a Q4_1 weight d * q + m carries up to ~15 significant bits, and bfloat16
    keeps 8, so most weights move by up to 2^-9 of their value (see `bf16_rounding_error`).
    """
    return requantize_gguf(build, src, "BF16", dst)


def requantize_gguf(
    build: LlamaCppBuild, src: str | os.PathLike, qtype: str, dst: str | os.PathLike | None = None
) -> Path:
    """`src` requantized by llama-quantize to `qtype` (BF16, Q8_0, Q4_0, ...), cached beside
    the build's models; made again only when `src` is newer."""
    src = Path(src)
    name = f"{src.stem.split('.')[0]}.{qtype}.gguf"
    dst = Path(dst) if dst else CACHE_ROOT / "models" / name
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_suffix(".partial")
    cmd = [str(build.binary("llama-quantize")), "--allow-requantize", str(src), str(partial), qtype]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    os.replace(partial, dst)
    return dst


def bf16_rounding_error(gguf_path: str | os.PathLike) -> dict[str, float]:
    """How far bfloat16 moves the dequantized weights of a quantized GGUF: the fraction of
    weights that are not exactly representable and the largest and RMS relative change, over
    all quantized tensors. (Checks the claim that requantizing to BF16 is lossless.)"""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    total = inexact = 0
    max_rel = sq_rel = 0.0
    for tensor in GGUFReader(str(gguf_path)).tensors:
        if tensor.tensor_type in plain:
            continue
        w = torch.from_numpy(np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type)))
        w = w.float().flatten()
        moved = (w.to(torch.bfloat16).float() - w).abs()
        nonzero = w != 0
        rel = moved[nonzero] / w[nonzero].abs()
        total += w.numel()
        inexact += int((moved > 0).sum())
        max_rel = max(max_rel, float(rel.max()) if rel.numel() else 0.0)
        sq_rel += float((rel.double() ** 2).sum())
    return {
        "num_weights": total,
        "inexact_fraction": inexact / max(total, 1),
        "max_rel_change": max_rel,
        "rms_rel_change": (sq_rel / max(total, 1)) ** 0.5,
    }
