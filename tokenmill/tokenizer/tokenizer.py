"""The engine's tokenizer: a `tokenizers.Tokenizer` (Rust) plus the model's special tokens and
chat template, built from a GGUF's metadata or a Hugging Face tokenizer.json folder."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer as RustTokenizer
from tokenizers import processors

from tokenmill.errors import InvalidRequestError, ModelLoadError
from tokenmill.tokenizer.chat_template import render_chat_template
from tokenmill.tokenizer.gguf_vocab import build_gguf_tokenizer, gguf_eos_token_ids


class Tokenizer:
    """Text <-> token ids for one model, with its BOS/EOS conventions and chat template.

    `encode(text)` adds BOS only when the model asks for it (GGUF `add_bos_token`, or the
    tokenizer.json post-processor / tokenizer_config.json `add_bos_token`). Special tokens
    written in the text (e.g. "<|im_start|>") are always matched as single tokens, as
    transformers and llama.cpp do.
    """

    def __init__(
        self,
        backend: RustTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.unk_token = unk_token
        self.pad_token = pad_token
        self._chat_template = chat_template
        self._bos_token_id = self._token_id(bos_token)
        eos_ids = [self._token_id(eos_token), *extra_eos_token_ids]
        self._eos_token_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        self._special_ids = frozenset(
            idx for idx, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        probe_with = backend.encode("a", add_special_tokens=True).ids
        probe_without = backend.encode("a", add_special_tokens=False).ids
        self.add_bos = (
            self._bos_token_id is not None
            and len(probe_with) > len(probe_without)
            and probe_with[0] == self._bos_token_id
        )

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> Tokenizer:
        """The tokenizer a GGUF file's `tokenizer.ggml.*` / `tokenizer.chat_template` describe."""
        backend = build_gguf_tokenizer(metadata)
        tokens = metadata["tokenizer.ggml.tokens"]

        def token(name: str) -> str | None:
            idx = metadata.get(f"tokenizer.ggml.{name}_token_id")
            return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

        bos, eos = token("bos"), token("eos")
        # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
        default_add_bos = metadata.get("tokenizer.ggml.model") == "llama"
        _set_bos_eos_processor(
            backend,
            bos if metadata.get("tokenizer.ggml.add_bos_token", default_add_bos) else None,
            eos if metadata.get("tokenizer.ggml.add_eos_token", False) else None,
        )
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            extra_eos_token_ids=gguf_eos_token_ids(metadata),
            unk_token=token("unknown"),
            pad_token=token("padding"),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_folder(cls, folder: str, extra_eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) of a HF model folder."""
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ModelLoadError(f"{folder} has no tokenizer.json")
        backend = RustTokenizer.from_file(path)
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        names = {
            f"{kind}_token": _token_content(config.get(f"{kind}_token"))
            for kind in ("bos", "eos", "unk", "pad")
        }
        if "add_bos_token" in config or "add_eos_token" in config:
            _set_bos_eos_processor(
                backend,
                names["bos_token"] if config.get("add_bos_token") else None,
                names["eos_token"] if config.get("add_eos_token") else None,
            )
        return cls(
            backend,
            bos_token=names["bos_token"],
            eos_token=names["eos_token"],
            extra_eos_token_ids=extra_eos_token_ids,
            unk_token=names["unk_token"],
            pad_token=names["pad_token"],
            chat_template=_hf_chat_template(folder, config),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def all_special_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def special_token_variables(self) -> dict[str, str | None]:
        """The special tokens a chat template may name."""
        return {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with `chat_template` (a jinja2 source) or the model's own template;
        token ids if `tokenize`.

        Extra keyword arguments become template variables (e.g. `tools`, `enable_thinking`).
        """
        template = chat_template if chat_template is not None else self._chat_template
        if template is None:
            raise InvalidRequestError("this model has no chat template; send a plain prompt")
        variables = {**self.special_token_variables(), **kwargs}
        text = render_chat_template(template, messages, add_generation_prompt, **variables)
        if not tokenize:
            return text
        # The template writes its own BOS when it wants one; add it only if it did not.
        ids = self.encode(text, add_special_tokens=False)
        if self.add_bos and (not ids or ids[0] != self._bos_token_id):
            ids.insert(0, self._bos_token_id)
        return ids


def _set_bos_eos_processor(backend: RustTokenizer, bos: str | None, eos: str | None) -> None:
    if bos is None and eos is None:
        backend.post_processor = None
        return
    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t is not None]
    single = " ".join(p for p in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if p)
    pair = " ".join(p for p in (single, bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if p)
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(folder: str, config: dict[str, Any]) -> str | None:
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(
        template, list
    ):  # [{"name": "default", "template": ...}, {"name": "tool_use"...}]
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return by_name.get("default") or next(iter(by_name.values()), None)
    if template is None:
        template = _read_json(os.path.join(folder, "chat_template.json")).get("chat_template")
    return template
