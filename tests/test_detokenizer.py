"""Streaming detokenization: token-by-token text equals the full decode, never shows a broken
character, keeps SentencePiece spaces, and decodes only a small window per token."""

from __future__ import annotations

import pytest

from tests._fixtures_loader import EDGE_CASES, diverse_texts, requires_gemma3
from tests._sharegpt import conversation_texts
from tokenmill.loader import default_model
from tokenmill.loader.gguf_file import GGUFFile
from tokenmill.loader.gguf_loader import open_gguf
from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer
from tokenmill.tokenizer.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def smollm_tok(smollm_path) -> Tokenizer:
    return open_gguf(smollm_path).tokenizer


def _replies() -> list[str]:
    # Assistant replies (what a server streams) plus the diverse corpus's emoji/CJK messages.
    return conversation_texts(150, role="gpt") + list(diverse_texts()[250:]) + EDGE_CASES


def _stream(tok, ids, prompt=(), step=1, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add_tokens(ids[i : i + step]) for i in range(0, len(ids), step)]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


def _check_stream(tok, text, prompt_ids=(), add_special_tokens=False):
    ids = tok.encode(text, add_special_tokens=add_special_tokens)
    deltas = _stream(tok, ids, prompt_ids)
    if prompt_ids:
        prompt_text = tok.decode(prompt_ids)
        full = tok.decode(list(prompt_ids) + ids)
        assert full.startswith(prompt_text)
        expected = full[len(prompt_text) :]
    else:
        expected = tok.decode(ids)
    assert "".join(deltas) == expected, text[:200]
    if REPLACEMENT not in expected:
        assert not any(REPLACEMENT in d for d in deltas), text[:200]
    return deltas


def test_stream_equals_full_decode(smollm_tok):
    held_back = 0
    for text in _replies():
        deltas = _check_stream(smollm_tok, text)
        held_back += sum(d == "" for d in deltas[:-1])
    # Multi-byte characters split across byte-level tokens really were held back.
    assert held_back > 100


def test_stream_after_a_prompt(smollm_tok):
    prompt = smollm_tok.apply_chat_template(
        [{"role": "user", "content": "Say something with emoji 🎉"}], tokenize=True
    )
    for text in _replies()[:200]:
        _check_stream(smollm_tok, text, prompt_ids=prompt)


def test_prompt_ending_inside_a_character(smollm_tok):
    ids = smollm_tok.encode("Weather: 🌦️🌈 and then some more text 😀 ok")
    for cut in range(1, len(ids)):
        _check_stream_ids(smollm_tok, ids[:cut], ids[cut:])


def _check_stream_ids(tok, prompt, out):
    # A character split between prompt and output belongs to neither text; everything after
    # it must stream exactly, and never as U+FFFD.
    text = "".join(_stream(tok, out, prompt))
    assert tok.decode(prompt + out).endswith(text)
    assert REPLACEMENT not in text
    assert text.endswith(" ok")


def test_multi_token_steps_and_special_tokens(smollm_tok):
    ids = smollm_tok.encode("<|im_start|>assistant\nDone 👍🏽 中文<|im_end|>\nnext")
    for step in (1, 2, 3, 7):
        assert "".join(_stream(smollm_tok, ids, step=step)) == smollm_tok.decode(ids)
        kept = "".join(_stream(smollm_tok, ids, step=step, skip_special_tokens=False))
        assert kept == smollm_tok.decode(ids, skip_special_tokens=False)
    assert "<|im_end|>" in kept


def test_incomplete_character_is_held_until_flush(smollm_tok):
    ids = smollm_tok.encode("ok 😀")
    assert len(smollm_tok.decode(ids[-1:])) and smollm_tok.decode(ids[:-1]).endswith(REPLACEMENT)
    detok = IncrementalDetokenizer(smollm_tok, [])
    assert detok.add_tokens(ids[:-1]) == "ok "
    assert detok.flush().startswith(REPLACEMENT)


class _CountingTokenizer:
    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.window_lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.window_lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_work_per_token_is_bounded(smollm_tok):
    text = " ".join(_replies()[:40])
    ids = smollm_tok.encode(text)
    assert len(ids) > 3000
    spy = _CountingTokenizer(smollm_tok)
    detok = IncrementalDetokenizer(spy, ids[:50])
    for token in ids[50:]:
        detok.add_tokens([token])
    assert max(spy.window_lengths) <= 16
    assert len(spy.window_lengths) <= 2 * len(ids) + 16


# --- SentencePiece: spaces live in "▁" tokens; byte fallback splits characters -------------


@pytest.fixture(scope="module")
def gemma_tok() -> Tokenizer:
    return open_gguf(default_model.gemma3_model_path()).tokenizer


@requires_gemma3
def test_sentencepiece_stream_keeps_spaces(gemma_tok):
    ids = gemma_tok.encode("Hello world again", add_special_tokens=False)
    assert _stream(gemma_tok, ids)[:-1] == ["Hello", " world", " again"]
    for text in _replies():
        _check_stream(gemma_tok, text)
        _check_stream(gemma_tok, text, prompt_ids=gemma_tok.encode("Reply:"))


@requires_gemma3
def test_sentencepiece_with_prefix_space_and_strip_decoder():
    # Llama 2 style: a "▁" is prepended to the text and stripped again on decode. A window
    # decoded alone would lose the space of its first token; the context keeps it.
    with GGUFFile(default_model.gemma3_model_path()) as gguf:
        meta = dict(gguf.metadata) | {"tokenizer.ggml.add_space_prefix": True}
    tok = Tokenizer.from_gguf_metadata(meta)
    prompt = tok.encode("Question: why?")
    for text in _replies()[:150]:
        ids = tok.encode(text, add_special_tokens=False)
        _check_stream(tok, text, prompt_ids=prompt)
        assert "".join(_stream(tok, ids)) == tok.decode(ids)
    ids = tok.encode("one two three", add_special_tokens=False)
    assert "".join(_stream(tok, ids, prompt)) == " one two three"
