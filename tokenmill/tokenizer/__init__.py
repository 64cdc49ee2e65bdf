"""Tokenization: the Tokenizer (GGUF metadata or tokenizer.json), chat templates, and the
incremental detokenizer used for streaming."""

from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer
from tokenmill.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer"]
