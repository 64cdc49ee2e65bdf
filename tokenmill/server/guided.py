"""Structured outputs from a request body: which grammar it asks for, compiled off the loop.

    response_format     {"type": "json_object"} | {"type": "json_schema", "json_schema":
                        {"name", "schema", "strict"}}           (OpenAI)
    guided_json / guided_regex / guided_choice / guided_grammar    (vLLM)
    structured_outputs  {"json" | "regex" | "choice" | "grammar" | "json_object"}   (vLLM)

At most one may be given. The grammar is compiled on a worker thread (the first compile of a
schema builds its parser; later requests with the same schema hit the compiler's cache), so the
engine thread only copies a ready matcher.
"""

from __future__ import annotations

import asyncio
import dataclasses

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import SamplingRequest
from tokenmill.server.state import ServerState
from tokenmill.structured.compiler import grammar_compiler
from tokenmill.structured.grammar import Grammar


def request_grammar(body: SamplingRequest) -> tuple[Grammar, str] | None:
    """The grammar `body` asks for and the field that asked, or None."""
    found = [(g, name) for name, g in _candidates(body) if g is not None]
    if len(found) > 1:
        names = ", ".join(name for _, name in found)
        raise APIError(400, f"only one structured-output constraint per request, got {names}")
    return found[0] if found else None


def _candidates(body: SamplingRequest) -> list[tuple[str, Grammar | None]]:
    def schema(value):
        return Grammar.json_schema(value, strict=False)

    makers = [
        ("guided_json", body.guided_json, schema),
        ("guided_regex", body.guided_regex, Grammar.regex),
        ("guided_choice", body.guided_choice, Grammar.choice),
        ("guided_grammar", body.guided_grammar, Grammar.grammar),
    ]
    spec = body.structured_outputs
    if spec is not None:
        makers += [
            ("structured_outputs.json", spec.json_, schema),
            ("structured_outputs.regex", spec.regex, Grammar.regex),
            ("structured_outputs.choice", spec.choice, Grammar.choice),
            ("structured_outputs.grammar", spec.grammar, Grammar.grammar),
            ("structured_outputs.json_object", spec.json_object or None, _json_object),
        ]
    out = [("response_format", _response_format(body))]
    for name, value, make in makers:
        if value is None:
            continue
        try:
            out.append((name, make(value)))
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), name) from exc
    return out


def _json_object(_) -> Grammar:
    return Grammar.json_object()


def _response_format(body: SamplingRequest) -> Grammar | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Grammar.json_object()
    spec = fmt.json_schema
    if spec is None or spec.schema_ is None:
        param = "response_format.json_schema" + ("" if spec is None else ".schema")
        raise APIError(400, f"response_format of type json_schema needs '{param}'", param)
    try:
        return Grammar.json_schema(spec.schema_, strict=bool(spec.strict))
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), "response_format.json_schema.schema") from exc


async def with_grammar(
    params: SamplingParams, grammar: Grammar | None, param: str | None, state: ServerState
) -> SamplingParams:
    """`params` constrained by `grammar`, compiled on a worker thread; 400 if it does not
    compile, naming `param`."""
    if grammar is None:
        return params
    if state.tokenizer is None:
        raise APIError(400, "structured outputs need the model's tokenizer", param)
    compiler = grammar_compiler(state.tokenizer)
    try:
        compiled = await asyncio.to_thread(compiler.compile, grammar)
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param) from exc
    return dataclasses.replace(params, grammar=compiled)
