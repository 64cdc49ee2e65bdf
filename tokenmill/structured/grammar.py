"""What a structured request must produce: a JSON schema, a regex, a choice or a grammar.

A `Grammar` is plain, hashable data (it is the compile cache's key and travels inside
SamplingParams); `compiled` is filled in by `GrammarCompiler.compile` and is not part of its
identity. The grammar engine is llguidance: `definition()` is its grammar text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tokenmill.errors import InvalidRequestError

if TYPE_CHECKING:
    from tokenmill.structured.compiler import CompiledGrammar

GrammarKind = Literal["json_schema", "regex", "choice", "grammar", "lark"]

# JSON as OpenAI's models write it: ", " and ": ", and no other whitespace between tokens, so a
# small model cannot wander off into endless newlines inside an object.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Grammar:
    kind: GrammarKind
    # The schema as JSON text (its key order kept: properties come out in that order), the regex,
    # the choices as a JSON list, or the grammar text (Lark or GBNF; "lark": llguidance Lark).
    source: str
    # json_schema: refuse keywords the engine cannot enforce (else they are ignored).
    strict: bool = True
    compiled: CompiledGrammar | None = field(default=None, compare=False, repr=False)

    @classmethod
    def json_schema(cls, schema: dict | str | bool, strict: bool = True) -> Grammar:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}") from exc
        if not isinstance(schema, dict | bool):
            raise InvalidRequestError("a JSON schema must be an object")
        return cls("json_schema", json.dumps(schema), strict)

    @classmethod
    def json_object(cls) -> Grammar:
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str]) -> Grammar:
        if not options or not all(isinstance(o, str) for o in options):
            raise InvalidRequestError("a choice must be a non-empty list of strings")
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def grammar(cls, text: str) -> Grammar:
        return cls("grammar", text)

    def definition(self) -> str:
        """llguidance's grammar text for this grammar (not yet checked against a tokenizer)."""
        from llguidance import LLMatcher, grammar_from

        try:
            if self.kind == "json_schema":
                options: dict[str, Any] = {**JSON_OPTIONS, "lenient": not self.strict}
                return LLMatcher.grammar_from_json_schema(self.source, overrides=options)
            if self.kind == "regex":
                return LLMatcher.grammar_from_regex(self.source)
            if self.kind == "lark":
                return LLMatcher.grammar_from_lark(self.source)
            return grammar_from(self.kind, self.source)
        except ValueError as exc:
            raise InvalidRequestError(f"invalid {self.kind.replace('_', ' ')}: {exc}") from exc
