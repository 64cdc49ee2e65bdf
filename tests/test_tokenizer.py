"""The Tokenizer built from GGUF metadata against transformers' tokenizer for the same file,
on ~500 ShareGPT messages plus edge cases; chat templates against transformers' renderer."""

from __future__ import annotations

import os
import re

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import pre_tokenizers

from tests._fixtures_loader import EDGE_CASES, diverse_texts, requires_gemma3
from tokenmill.errors import InvalidRequestError, UnsupportedModelError
from tokenmill.loader import default_model
from tokenmill.loader.gguf_loader import open_gguf
from tokenmill.tokenizer.gguf_vocab import build_gguf_tokenizer
from tokenmill.tokenizer.tokenizer import Tokenizer

_DIGIT = re.compile(r"\d|[^\W\d_a-zA-Z]")  # any char \p{N} might match, conservatively


@pytest.fixture(scope="module")
def ours(smollm_path) -> Tokenizer:
    return open_gguf(smollm_path).tokenizer


@pytest.fixture(scope="module")
def reference(hf_tokenizer):
    return hf_tokenizer  # the tokenizer alone: the model (~20 s) is not needed here


@pytest.fixture(scope="module")
def reference_split_digits(reference) -> RustTokenizer:
    # transformers' GGUF conversion ignores tokenizer.ggml.pre = "smollm" and uses GPT-2's
    # pre-tokenizer. SmolLM2's own tokenizer.json (and llama.cpp's "smollm" regexes) first
    # split every digit off; this is transformers' vocabulary with that pre-tokenizer.
    backend = RustTokenizer.from_str(reference.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return backend


def _texts() -> list[str]:
    return list(diverse_texts()) + EDGE_CASES


def test_corpus_is_diverse():
    texts = diverse_texts()
    assert len(texts) >= 450
    assert (
        sum(bool(re.search(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]", t)) for t in texts) >= 80
    )
    assert sum(bool(re.search(r"[\U0001F300-\U0001FAFF]", t)) for t in texts) >= 20
    assert sum("```" in t for t in texts) >= 20


def test_encode_equals_reference_with_smollm_pre_tokenizer(ours, reference_split_digits):
    for text in _texts():
        assert ours.encode(text) == reference_split_digits.encode(text).ids, text[:200]


def test_encode_equals_transformers_on_text_without_digits(ours, reference):
    checked = 0
    for text in _texts():
        if not _DIGIT.search(text):
            assert ours.encode(text) == reference(text)["input_ids"], text[:200]
            checked += 1
    assert checked >= 100


def test_digits_are_split_like_llama_cpp_smollm(ours):
    ids = ours.encode("In 2024:\n\n1. x")
    assert ours.convert_ids_to_tokens(ids) == [
        "In",
        "Ġ",
        "2",
        "0",
        "2",
        "4",
        ":",
        "ĊĊ",
        "1",
        ".",
        "Ġx",
    ]


def test_decode_round_trip(ours, reference):
    for text in _texts():
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_matched_whole(ours):
    ids = ours.encode("<|im_start|>user\nHi<|im_end|>\n")
    assert ids[0] == 1 and ids[-2] == 2
    assert ours.convert_ids_to_tokens(ids) == ["<|im_start|>", "user", "Ċ", "Hi", "<|im_end|>", "Ċ"]
    assert ours.decode(ids) == "user\nHi\n"
    assert ours.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_properties(ours):
    assert ours.vocab_size == 49152
    assert ours.bos_token_id == 1 and ours.eos_token_ids == (2,)
    assert ours.all_special_ids == frozenset(range(17))
    assert ours.add_bos is False and ours.encode("hi")[0] != 1
    assert ours.chat_template.startswith("{% for message in messages %}")
    assert ours.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# --- chat templates ---------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "user", "content": "Write a haiku about 🍵 and 東京."},
        {"role": "assistant", "content": "Steam rises slowly\nover the city of lights"},
        {"role": "user", "content": "Another, with <|im_end|> inside?"},
    ],
    [{"role": "user", "content": ""}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_equals_transformers(ours, reference, conversation, add_generation_prompt):
    text = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert text == reference.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    ids = ours.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    ref_ids = reference.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    assert ids == ref_ids["input_ids"]


FEATURE_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}"
    "  {{ m.role | upper }}: {{ m.content | tojson }}\n"
    "{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{{ tools | tojson(indent=2) }} {{ ns.n }} {{ eos_token }}"
    "{% if add_generation_prompt %}<go>{% endif %}"
)


def test_template_features_equal_transformers(ours):
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [
        {"role": "user", "content": 'naïve 中文 "quoted"'},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "ok"},
    ]
    tools = [{"name": "get_time", "parameters": {"zone": "Europe/Zürich"}}]
    tok = Tokenizer(
        ours.backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_template=FEATURE_TEMPLATE,
    )
    ours_text = tok.apply_chat_template(messages, tools=tools)
    ref_text = render_jinja_template(
        [messages],
        chat_template=FEATURE_TEMPLATE,
        add_generation_prompt=True,
        tools=tools,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )[0][0]
    assert ours_text == ref_text
    assert "Zürich" in ours_text and ours_text.endswith("<go>")


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([{"content": "no role"}], "no 'role'"),
        ([{"role": 3, "content": "x"}], "role must be a string"),
        ([{"role": "user"}], "no 'content'"),
        ("just a string", "must be a list"),
        ([["user", "hi"]], "must be an object"),
        ([{"role": "user", "content": 42}], "content must be"),
    ],
)
def test_bad_messages_are_invalid_requests(ours, messages, problem):
    with pytest.raises(InvalidRequestError, match=problem):
        ours.apply_chat_template(messages)


def test_template_exceptions_and_missing_template(ours):
    strict = Tokenizer(
        ours.backend,
        chat_template="{% if messages[0].role != 'user' %}"
        "{{ raise_exception('first message must be from the user') }}{% endif %}ok",
    )
    assert strict.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidRequestError, match="first message must be from the user"):
        strict.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer(ours.backend).apply_chat_template([{"role": "user", "content": "x"}])


def test_sandbox_blocks_attribute_escapes(ours):
    evil = Tokenizer(ours.backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


# --- pre-tokenizer selection (no real Llama 3 / Qwen file is bundled) --------------------


def _byte_level_metadata(pre: str) -> dict:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": alphabet,
        "tokenizer.ggml.merges": [],
    }


@pytest.mark.parametrize(
    "pre, pieces",
    [
        ("llama-bpe", ["123", "45", "Ġabc", "'S"]),
        ("qwen2", ["1", "2", "3", "4", "5", "Ġabc", "'S"]),
        ("smollm", ["1", "2", "3", "4", "5", "Ġabc", "'", "S"]),
        ("default", ["12345", "Ġabc", "'", "S"]),
    ],
)
def test_pre_tokenizer_follows_tokenizer_ggml_pre(pre, pieces):
    backend = build_gguf_tokenizer(_byte_level_metadata(pre))
    split = backend.pre_tokenizer.pre_tokenize_str("12345 abc'S")
    assert [piece for piece, _ in split] == pieces


def test_unknown_pre_tokenizer_and_model_are_refused():
    with pytest.raises(UnsupportedModelError, match="'tekken-9000'"):
        build_gguf_tokenizer(_byte_level_metadata("tekken-9000"))
    meta = _byte_level_metadata("default") | {"tokenizer.ggml.model": "bert"}
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        build_gguf_tokenizer(meta)


# --- Gemma 3 (SentencePiece BPE with byte fallback) -------------------------------------


@pytest.fixture(scope="module")
def gemma_tok() -> Tokenizer:
    return open_gguf(default_model.gemma3_model_path()).tokenizer


@requires_gemma3
def test_gemma3_tokenizer_basics(gemma_tok):
    assert gemma_tok.vocab_size == 262144
    assert gemma_tok.bos_token_id == 2 and gemma_tok.eos_token_ids == (1,)
    assert gemma_tok.add_bos and gemma_tok.chat_template is None
    # Values from transformers' tokenizer for this file: whitespace runs and "\n\n" are
    # user-defined tokens matched whole; a word after a space carries "▁".
    assert gemma_tok.encode("Hello  world  \n\n x") == [2, 9259, 138, 12392, 138, 108, 1123]
    assert gemma_tok.convert_ids_to_tokens([9259, 1123]) == ["Hello", "▁x"]
    assert gemma_tok.decode(gemma_tok.encode("<start_of_turn>user\nhi<end_of_turn>")) == "user\nhi"


@requires_gemma3
def test_gemma3_round_trip_with_byte_fallback(gemma_tok):
    for text in _texts():
        ids = gemma_tok.encode(text, add_special_tokens=False)
        assert gemma_tok.decode(ids, skip_special_tokens=False) == text, text[:200]
    ids = gemma_tok.encode("\U0010ffff", add_special_tokens=False)
    assert all(tok.startswith("<0x") for tok in gemma_tok.convert_ids_to_tokens(ids))


@requires_gemma3
@pytest.mark.slow
def test_gemma3_encode_equals_transformers(gemma_tok):
    from transformers import AutoTokenizer

    folder, name = os.path.split(default_model.gemma3_model_path())
    reference = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in _texts():
        assert gemma_tok.encode(text) == reference(text)["input_ids"], text[:200]
