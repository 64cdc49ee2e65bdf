"""Structured outputs: token masks from a grammar engine (llguidance), for the requests that
ask for them (`SamplingParams.grammar`).

    grammar.py    Grammar: what to produce (JSON schema, regex, choice, grammar), plain data
    compiler.py   GrammarCompiler (per tokenizer, cached per grammar) and the per-request
                  GrammarMatcher the sampler masks logits with
"""

from tokenmill.structured.grammar import Grammar

__all__ = ["Grammar"]
