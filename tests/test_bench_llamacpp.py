"""llama.cpp as a peer: the cached-build bookkeeping and command lines always; the real
llama-server and llama-bench when a build is cached (`tokenmill bench compare` makes one)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from tokenmill.bench import llamacpp
from tokenmill.bench.serve import ServeTarget, run_load
from tokenmill.workload import build_workload

BUILDS = llamacpp.cached_builds()
needs_build = pytest.mark.skipif(not BUILDS, reason="no cached llama.cpp build")


def _fake_build(root, version):
    bin_dir = root / version / "build" / "bin"
    bin_dir.mkdir(parents=True)
    for name in llamacpp.TARGETS:
        (bin_dir / name).write_text("")
    (root / version / "build.json").write_text(
        json.dumps({"version": version, "bin_dir": str(bin_dir)})
    )
    return bin_dir


def test_cached_builds_are_found_newest_last_and_reused(tmp_path):
    _fake_build(tmp_path, "0.3.9")
    _fake_build(tmp_path, "0.3.16")
    (tmp_path / "0.4.0").mkdir()  # an unfinished build has no build.json
    assert [b.version for b in llamacpp.cached_builds(tmp_path)] == ["0.3.9", "0.3.16"]
    # Reused without pip or cmake: either version asked for, or the newest when none is.
    assert llamacpp.ensure_built(None, tmp_path).version == "0.3.16"
    assert llamacpp.ensure_built("0.3.9", tmp_path).version == "0.3.9"


def test_only_the_vendored_source_is_extracted(tmp_path):
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name in ("llama_cpp_python-9.9.9/vendor/llama.cpp/CMakeLists.txt",
                     "llama_cpp_python-9.9.9/llama_cpp/llama.py"):  # fmt: skip
            data = b"x"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = llamacpp._extract_vendored_source(sdist, tmp_path / "out")
    assert sorted(p.name for p in src.rglob("*")) == ["CMakeLists.txt"]


def test_server_command_is_fair_to_the_concurrency(tmp_path):
    build = llamacpp.LlamaCppBuild("x", _fake_build(tmp_path, "x"))
    per_slot = llamacpp.LlamaServer(build, "m.gguf", parallel=8, ctx_per_slot=1024, threads=2)
    cmd = per_slot.cmd
    assert cmd[cmd.index("--parallel") + 1] == "8" and cmd[cmd.index("-c") + 1] == "8192"
    assert "--cont-batching" in cmd and cmd[cmd.index("-t") + 1] == "2"
    shared = llamacpp.LlamaServer(build, "m.gguf", parallel=8, kv_tokens=50000)
    assert shared.cmd[shared.cmd.index("-c") + 1] == "50000" and "--kv-unified" in shared.cmd


def test_bf16_cannot_hold_every_dequantized_q4_1_weight(smollm_path):
    # Q4_1 weights are d * q + m with fp16 d and m: up to ~15 significant bits, bfloat16 keeps 8.
    err = llamacpp.bf16_rounding_error(smollm_path)
    assert err["num_weights"] > 100e6
    assert 0.5 < err["inexact_fraction"] < 1.0
    assert 0 < err["rms_rel_change"] < err["max_rel_change"] <= 2**-8


@needs_build
def test_llama_server_answers_the_load_generator(smollm_path):
    with llamacpp.LlamaServer(BUILDS[-1], smollm_path, parallel=2, ctx_per_slot=512) as server:
        workload = build_workload("fixed:in=16,out=5", 3)
        run = run_load(ServeTarget(server.base_url, "m"), workload, num_warmup=1, progress=False)
    assert [r.error for r in run.results] == [""] * 3
    assert all(r.output_len == 5 and r.ttft_s > 0 for r in run.results)  # ignore_eos honoured


@needs_build
def test_llama_bench_reports_prefill_and_decode(smollm_path):
    rows = llamacpp.llama_bench(BUILDS[-1], smollm_path, n_prompt=32, n_gen=8, repetitions=1)
    assert {(r["n_prompt"], r["n_gen"]) for r in rows} == {(32, 0), (0, 8)}
    assert all(r["avg_ts"] > 0 for r in rows)


@needs_build
def test_bf16_gguf_holds_the_weights_tokenmill_loads_in_bfloat16(smollm_path, tmp_path):
    import torch

    from tokenmill.config import ModelConfig
    from tokenmill.loader.registry import open_model

    bf16 = llamacpp.to_bf16_gguf(BUILDS[-1], smollm_path, tmp_path / "m.BF16.gguf")
    ours = dict(open_model(ModelConfig(model=smollm_path)).iter_weights(torch.bfloat16))
    theirs = dict(open_model(ModelConfig(model=str(bf16))).iter_weights(torch.bfloat16))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit for bit
