"""Grammars compiled against a tokenizer (llguidance), cached per grammar.

    compiler = grammar_compiler(tokenizer)      # one per tokenizer
    grammar = compiler.compile(Grammar.json_schema(schema))   # slow the first time: off the
                                                               # engine thread (the server)
    matcher = grammar.compiled.new_matcher()    # per request, in the runner: a cheap copy
    matcher.mask_logits(logits_row, end_ids); matcher.accept(token)

Compiling builds the grammar's lexer and parser once; each request then gets a copy of that
matcher at its start state, so a schema sent again costs nothing to compile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokenmill.errors import InvalidRequestError
from tokenmill.structured.grammar import Grammar

if TYPE_CHECKING:
    from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class GrammarMatcher:
    """One request's position in its grammar: which tokens may come next."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size  # the grammar engine's (its bitmask's) vocabulary

    @property
    def engine_matcher(self) -> Any:
        """llguidance's matcher, for batched calls (tokenmill.structured.masks)."""
        return self._matcher

    @property
    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()

    def mask_logits(self, logits: torch.Tensor, end_ids: Sequence[int] = ()) -> None:
        """logits [V] -> -inf for every token the grammar does not allow next. `end_ids` (stop
        tokens the grammar engine does not know, e.g. an end-of-turn token) are allowed
        wherever the grammar allows its EOS: when the output is complete."""
        # Bit i of the little-endian mask words is token i.
        words = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(words, bitorder="little")  # (32 * num_words,)
        vocab = logits.shape[0]
        if bits.shape[0] < vocab:
            bits = np.concatenate([bits, np.zeros(vocab - bits.shape[0], dtype=np.uint8)])
        allowed = bits[:vocab].astype(bool)
        if self._matcher.is_accepting():
            allowed[[t for t in end_ids if t < vocab]] = True
        if logits.device.type == "cpu":
            # In numpy: one thread. A torch op this small spends more on waking OpenMP's
            # threads than on the work (tens of ms on a busy machine).
            logits.numpy()[~allowed] = -np.inf
        else:
            logits.masked_fill_(~torch.from_numpy(allowed).to(logits.device), float("-inf"))

    def accept(self, token_id: int) -> None:
        if not self._matcher.is_stopped():
            self._matcher.consume_token(token_id)

    @property
    def is_error(self) -> bool:
        return self._matcher.is_error()


class CompiledGrammar:
    """A grammar's matcher at its start state; `new_matcher()` copies it for one request."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._template = matcher
        self.vocab_size = vocab_size

    def new_matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._template.deep_copy(), self.vocab_size)


class GrammarCompiler:
    """Compiles grammars for one tokenizer; thread-safe, LRU-cached by grammar."""

    def __init__(self, tokenizer: Any, max_cached: int = 256) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._cache: OrderedDict[Grammar, CompiledGrammar] = OrderedDict()
        self.max_cached = max_cached
        self.num_compiled = 0  # grammars compiled (cache misses), and the time they took
        self.compile_seconds_total = 0.0

    def compile(self, grammar: Grammar) -> Grammar:
        """`grammar` with `compiled` set; raises InvalidRequestError naming what is wrong."""
        if grammar.compiled is not None:
            return grammar
        key = replace(grammar, compiled=None)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return replace(grammar, compiled=compiled)
        start = time.perf_counter()
        compiled = CompiledGrammar(self._new_matcher(grammar), self.ll_tokenizer().vocab_size)
        elapsed = time.perf_counter() - start
        logger.debug("compiled a %s grammar in %.1f ms", grammar.kind, elapsed * 1e3)
        with self._lock:
            self._cache[key] = compiled
            self.num_compiled += 1
            self.compile_seconds_total += elapsed
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return replace(grammar, compiled=compiled)

    def _new_matcher(self, grammar: Grammar) -> Any:
        from llguidance import LLMatcher

        definition = grammar.definition()
        try:
            matcher = LLMatcher(self.ll_tokenizer(), definition, log_level=0)
        except (ValueError, RuntimeError) as exc:
            raise InvalidRequestError(f"invalid {grammar.kind.replace('_', ' ')}: {exc}") from exc
        if matcher.is_error():
            kind = grammar.kind.replace("_", " ")
            raise InvalidRequestError(f"invalid {kind}: {matcher.get_error()}")
        return matcher

    def ll_tokenizer(self) -> Any:
        """llguidance's view of the tokenizer (about 0.3 s to build: once, on first use)."""
        with self._lock:
            if self._ll_tokenizer is None:
                from llguidance import LLTokenizer

                tok = self._tokenizer
                self._ll_tokenizer = LLTokenizer(
                    tok.backend.to_str(), eos_token=list(tok.eos_token_ids) or None
                )
            return self._ll_tokenizer


@lru_cache(maxsize=8)
def grammar_compiler(tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler(tokenizer)


def with_compiled_grammar(params: SamplingParams, tokenizer: Any) -> SamplingParams:
    """`params` with its grammar compiled (a cache hit when the server compiled it already)."""
    if params.grammar is None or params.grammar.compiled is not None:
        return params
    if tokenizer is None:
        raise InvalidRequestError("structured outputs need the model's tokenizer")
    return replace(params, grammar=grammar_compiler(tokenizer).compile(params.grammar))
