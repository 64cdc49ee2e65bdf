"""Batched grammar masks (tokenmill.structured.masks) against the per-row path
(GrammarMatcher.mask_logits): the same tokens allowed on every row, at grammar states reached by
random walks, with end-of-turn ids, padded vocabularies and rows without a grammar."""

from __future__ import annotations

import random

import pytest
import torch

from tokenmill.loader.default_model import default_model_path
from tokenmill.loader.gguf_loader import open_gguf
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.compiler import GrammarCompiler
from tokenmill.structured.grammar import Grammar
from tokenmill.structured.masks import apply_bitmask, fill_bitmask
from tokenmill.structured.schema_gen import random_schema
from tokenmill.worker.sampler import SamplingRow, sample


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler(open_gguf(default_model_path(), with_tokenizer=True).tokenizer)


def grammars(compiler) -> list[Grammar]:
    rng = random.Random(7)
    found = [Grammar.json_schema(random_schema(rng)) for _ in range(4)]
    found += [Grammar.choice(["yes", "no"]), Grammar.regex(r"[a-c]{1,3}\d"), Grammar.json_object()]
    return [compiler.compile(g) for g in found]


def per_row_allowed(matcher, vocab: int, end_ids) -> set[int]:
    logits = torch.zeros(vocab)
    matcher.mask_logits(logits, end_ids)
    return set(torch.nonzero(logits == 0).flatten().tolist())


def walk(matcher, vocab: int, rng: random.Random, num_steps: int) -> None:
    """Advance `matcher` by up to `num_steps` tokens its grammar allows, chosen at random."""
    for _ in range(num_steps):
        allowed = sorted(per_row_allowed(matcher, vocab, ()) - set(range(3)))  # not EOS
        if not allowed:
            return
        matcher.accept(rng.choice(allowed))


@pytest.mark.parametrize("num_steps", [0, 1, 3, 8])
@pytest.mark.parametrize("pad, parallel", [(0, False), (64, False), (64, True)])
def test_batched_masks_equal_per_row_masks(compiler, num_steps, pad, parallel):
    tokenizer = compiler._tokenizer
    vocab = tokenizer.vocab_size + pad  # the model's rows may be padded past the tokenizer
    end_ids = [tokenizer.vocab_size - 1]
    rng = random.Random(num_steps)
    matchers = [g.compiled.new_matcher() for g in grammars(compiler)]
    for m in matchers:
        walk(m, vocab, rng, num_steps)
    # Rows 0, 2, 4, ... carry a grammar; the others must come out untouched.
    rows = [2 * j for j in range(len(matchers))]
    logits = torch.zeros(2 * len(matchers), vocab)
    bitmask = fill_bitmask(matchers, [end_ids] * len(matchers), parallel=parallel)
    apply_bitmask(logits, rows, bitmask)
    for j, m in enumerate(matchers):
        got = set(torch.nonzero(logits[rows[j]] == 0).flatten().tolist())
        assert got == per_row_allowed(m, vocab, end_ids), j
        assert (logits[rows[j] + 1] == 0).all()


def test_end_ids_allowed_once_complete(compiler):
    tokenizer = compiler._tokenizer
    matcher = compiler.compile(Grammar.choice(["yes", "no"])).compiled.new_matcher()
    for token in tokenizer.encode("yes", add_special_tokens=False):
        matcher.accept(token)
    end_of_turn = tokenizer.vocab_size - 1
    logits = torch.zeros(1, tokenizer.vocab_size)
    apply_bitmask(logits, [0], fill_bitmask([matcher], [[end_of_turn]]))
    allowed = set(torch.nonzero(logits[0] == 0).flatten().tolist())
    assert allowed == {*tokenizer.eos_token_ids, end_of_turn}


def test_sample_masks_grammar_rows_only(compiler):
    tokenizer = compiler._tokenizer
    grammar = compiler.compile(Grammar.choice(["yes", "no"]))
    vocab = tokenizer.vocab_size
    logits = torch.randn(4, vocab)
    expected_free = logits[1].argmax().item()
    rows = []
    for i in range(4):
        constrained = i != 1
        params = SamplingParams(temperature=0 if i < 3 else 0.8, max_tokens=4,
                                grammar=grammar if constrained else None)  # fmt: skip
        matcher = grammar.compiled.new_matcher() if constrained else None
        rows.append(SamplingRow(params, torch.Generator().manual_seed(i), [1], [], matcher))
    tokens, _ = sample(logits, rows, [[] for _ in rows])
    firsts = {tokenizer.decode([t]) for i, t in enumerate(tokens) if i != 1}
    assert firsts <= {"y", "ye", "yes", "n", "no"}
    assert tokens[1] == expected_free


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_grammar_rows_read_the_bitmask_natively(compiler, dtype, monkeypatch):
    """All-greedy batches with grammar rows skip the float copy and masked fill: the native
    argmax reads the bitmask and picks the tokens the masked fill would have."""
    from tokenmill.worker import sampler

    tokenizer = compiler._tokenizer
    vocab = tokenizer.vocab_size + 64  # a padded lm_head: the padding is never allowed
    rng = random.Random(3)
    compiled = grammars(compiler)
    matchers = [g.compiled.new_matcher() for g in compiled]
    for m in matchers:
        walk(m, vocab, rng, 2)
    logits = torch.randn(len(matchers) + 2, vocab, generator=torch.Generator().manual_seed(1))
    logits = logits.to(dtype)
    logits[:, tokenizer.vocab_size :] = 50.0  # would win if the padding were not masked
    rows, constrained = [], []
    for i in range(logits.shape[0]):
        j = i - 1
        grammar = compiled[j] if 0 <= j < len(matchers) else None
        params = SamplingParams(temperature=0, max_tokens=4, grammar=grammar)
        matcher = matchers[j] if grammar is not None else None
        if matcher is not None:
            constrained.append(i)
        rows.append(SamplingRow(params, None, [1], [], matcher))
    bitmask = fill_bitmask([rows[i].matcher for i in constrained], [()] * len(constrained))
    reference = logits.float().clone()
    apply_bitmask(reference, constrained, bitmask)
    expected = reference.argmax(dim=-1).tolist()

    def no_masked_fill(*args, **kwargs):
        raise AssertionError("the general path's masked fill ran")

    monkeypatch.setattr(sampler, "apply_bitmask", no_masked_fill)
    accepted = []
    for i in constrained:
        monkeypatch.setattr(rows[i].matcher, "accept", lambda t, i=i: accepted.append((i, t)))
    tokens, logprobs = sample(logits, rows, [[] for _ in rows])
    assert tokens == expected
    assert logprobs == [None] * len(rows)
    assert accepted == [(i, expected[i]) for i in constrained]  # each matcher advanced


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_unpack_equals_cpu_unpack(compiler):
    matchers = [g.compiled.new_matcher() for g in grammars(compiler)]
    bitmask = fill_bitmask(matchers, [()] * len(matchers), parallel=True)
    vocab = compiler._tokenizer.vocab_size + 64
    rows = [2 * j for j in range(len(matchers))]
    for subset in (rows, list(range(len(matchers)))):
        logits = torch.randn(2 * len(matchers), vocab)
        on_gpu = logits.cuda()
        apply_bitmask(logits, subset, bitmask)
        apply_bitmask(on_gpu, subset, bitmask)
        assert torch.equal(on_gpu.cpu(), logits)
