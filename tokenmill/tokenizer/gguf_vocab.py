"""Build a `tokenizers.Tokenizer` from a GGUF file's `tokenizer.ggml.*` metadata.

A GGUF carries no tokenizer.json, only what llama.cpp's tokenizer needs, so we rebuild the
pipeline llama.cpp runs (llama-vocab.cpp) from the same pieces:

- "gpt2": byte-level BPE from `tokens` + `merges`. The text is first split by the regexes that
  `tokenizer.ggml.pre` names (each applied to the pieces of the previous one), then mapped to
  the byte alphabet. Llama 3 ("llama-bpe") also looks whole pieces up before merging
  (`ignore_merges`).
- "llama": SentencePiece BPE. Spaces become U+2581, symbols merge best-score-first, unknown
  characters fall back to <0xXX> byte tokens. The GGUF has scores, not merges, so the merges
  are recovered: every split of a token into two tokens, ranked by the token's score.

Tokens typed CONTROL become special added tokens and USER_DEFINED ones plain added tokens;
both are matched whole in the text before the model runs, as llama.cpp does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from tokenmill.errors import UnsupportedModelError

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (regexes applied in turn, ignore_merges), after llama-vocab.cpp.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo", "jais"), ((_GPT2,), False)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"),
        ((r"\p{N}", _GPT2), False),
    ),
    **dict.fromkeys(
        ("llama-bpe", "llama3", "llama-v3", "falcon3", "dbrx", "smaug-bpe"), ((_LLAMA3,), True)
    ),
    **dict.fromkeys(
        ("qwen2", "qwen2.5", "qwen-2.5", "deepseek-r1-qwen", "stablelm2"), ((_QWEN2,), False)
    ),
}


def build_gguf_tokenizer(metadata: dict[str, Any]) -> RustTokenizer:
    """The tokenizer a GGUF describes, without BOS/EOS post-processing (the caller adds that)."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types = _as_list(metadata.get("tokenizer.ggml.token_type"), NORMAL, len(tokens))
    if kind == "gpt2":
        tok = _byte_level_bpe(metadata, tokens)
    elif kind == "llama":
        scores = _as_list(metadata.get("tokenizer.ggml.scores"), 0.0, len(tokens))
        tok = _sentencepiece_bpe(metadata, tokens, scores, types)
    else:
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)"
        )
    _add_special_tokens(tok, tokens, types)
    return tok


def gguf_eos_token_ids(metadata: dict[str, Any]) -> tuple[int, ...]:
    """The GGUF's end-of-sequence id, then its end-of-turn and end-of-message ids if set."""
    ids: list[int] = []
    for name in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = metadata.get(f"tokenizer.ggml.{name}")
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    return tuple(ids)


def _as_list(values: Any, default: Any, count: int) -> list:
    return [default] * count if values is None else list(values.tolist())


def _byte_level_bpe(metadata: dict[str, Any], tokens: list[str]) -> RustTokenizer:
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"GGUF pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    vocab = {token: idx for idx, token in enumerate(tokens)}
    tok = RustTokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(
    metadata: dict[str, Any], tokens: list[str], scores: list[float], types: list[int]
) -> RustTokenizer:
    vocab = {token: idx for idx, token in enumerate(tokens)}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        vocab,
        _merges_from_scores(tokens, scores, types, vocab),
        unk_token=tokens[unk_id] if unk_id is not None else None,
        byte_fallback=BYTE in types,
        fuse_unk=True,
    )
    tok = RustTokenizer(model)
    steps = [normalizers.Replace(" ", "\u2581")]
    if metadata.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    decode_steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if metadata.get("tokenizer.ggml.add_space_prefix", True):
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode_steps)
    return tok


def _merges_from_scores(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    # SentencePiece BPE merges the adjacent pair whose union is the best-scoring vocabulary
    # piece; a BPE merge list ranked by that score (ties: lower id) picks the same pair.
    ranked = []
    for idx, token in enumerate(tokens):
        if types[idx] != NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[idx], idx, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(tok: RustTokenizer, tokens: list[str], types: list[int]) -> None:
    control = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, kind in enumerate(types)
        if kind in (CONTROL, UNKNOWN)
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, kind in enumerate(types)
        if kind == USER_DEFINED
    ]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
