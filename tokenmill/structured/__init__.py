"""Structured outputs: token masks from a grammar engine (llguidance), for the requests that
ask for them (`SamplingParams.grammar`).

    grammar.py    Grammar: what to produce (JSON schema, regex, choice, grammar), plain data
    compiler.py   GrammarCompiler (per tokenizer, cached per grammar) and the per-request
                  GrammarMatcher (its position in the grammar)
    masks.py      the next-token bitmask of every constrained row at once, applied as one fill
    schema_gen.py a seeded generator of small JSON schemas (tests, the structured bench)
"""

from tokenmill.structured.grammar import Grammar

__all__ = ["Grammar"]
