"""Structured outputs through the real server and the official client: response_format
json_schema / json_object, vLLM's guided_* and structured_outputs, 50 random schemas whose
replies all validate, requests without a grammar unaffected in the same batch, and 400s for
constraints that cannot compile. Also the compiler's cache and the matcher's mask directly."""

from __future__ import annotations

import asyncio
import json
import random
import re

import httpx
import jsonschema
import pytest
import torch

from tests.server_fixtures import MODEL_NAME, SHARED_ARGS, shared_server_fixture
from tokenmill.errors import InvalidRequestError
from tokenmill.loader.default_model import default_model_path
from tokenmill.loader.gguf_loader import open_gguf
from tokenmill.structured.compiler import GrammarCompiler
from tokenmill.structured.grammar import Grammar
from tokenmill.structured.schema_gen import random_schema

server = shared_server_fixture(*SHARED_ARGS)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}


def test_json_schema_whole_and_streamed(server):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, messages=ASK, max_tokens=80, temperature=0,
                  response_format=schema_format(PERSON))  # fmt: skip
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].finish_reason == "stop"
    reply = json.loads(whole.choices[0].message.content)
    jsonschema.validate(reply, PERSON)
    assert list(reply) == ["name", "age", "pets"]  # the schema's order
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **kwargs)
        if c.choices
    )
    assert streamed == whole.choices[0].message.content


def test_json_object_and_sampling(server):
    ask = [{"role": "user", "content": 'Give me {"ok": true} as JSON.'}]
    out = server.client().chat.completions.create(
        model=MODEL_NAME, messages=ask, max_tokens=60, temperature=0.7, seed=5, n=2,
        response_format={"type": "json_object"},
    )  # fmt: skip
    for choice in out.choices:  # sampled rows are masked too
        assert choice.finish_reason == "stop"
        assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize(
    "extra, check",
    [
        ({"guided_choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
        ({"guided_regex": r"\d{3}-\d{4}"}, lambda t: re.fullmatch(r"\d{3}-\d{4}", t)),
        ({"guided_grammar": 'start: "(" NUM ")"\nNUM: /[0-9]{1,3}/'},
         lambda t: re.fullmatch(r"\(\d{1,3}\)", t)),
        ({"guided_json": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                          "required": ["ok"], "additionalProperties": False}},
         lambda t: isinstance(json.loads(t)["ok"], bool)),
        ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
    ],
)  # fmt: skip
def test_vllm_guided_fields_on_completions(server, extra, check):
    out = server.client().completions.create(
        model=MODEL_NAME, prompt="Answer:", max_tokens=30, temperature=0.8, seed=3,
        extra_body=extra,
    )  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    assert check(out.choices[0].text), out.choices[0].text


def test_50_random_schemas_validate_and_plain_requests_are_unaffected(server):
    rng = random.Random(16)
    schemas = [random_schema(rng) for _ in range(50)]
    client = server.async_client()
    plain = dict(model=MODEL_NAME, messages=ASK, max_tokens=24, temperature=0)

    async def constrained(schema: dict):
        out = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Fill in the JSON."}],
            max_tokens=120, temperature=0, response_format=schema_format(schema),
        )  # fmt: skip
        return out.choices[0]

    async def run():
        alone = await client.chat.completions.create(**plain)
        *choices, batched = await asyncio.gather(
            *(constrained(s) for s in schemas), client.chat.completions.create(**plain)
        )
        return alone, choices, batched

    alone, choices, batched = asyncio.run(run())
    assert batched.choices[0].message.content == alone.choices[0].message.content
    finished = [(c, s) for c, s in zip(choices, schemas, strict=True) if c.finish_reason == "stop"]
    # A 135M model may run a number's digits on to max_tokens; every reply that ended validates.
    assert len(finished) >= 45, [c.message.content for c in choices if c.finish_reason != "stop"]
    for choice, schema in finished:
        jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"guided_regex": "["}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_grammar": "start: missing_rule"}, "guided_grammar"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema.schema"),
        ({"response_format": schema_format({"type": "array", "uniqueItems": True})},
         "response_format"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, None),
    ],
)  # fmt: skip
def test_bad_constraints_are_400(server, body, param):
    full = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    r = httpx.post(server.url("/v1/chat/completions"), json=full, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler(open_gguf(default_model_path(), with_tokenizer=True).tokenizer)


def test_compiler_caches_per_grammar(compiler):
    first = compiler.compile(Grammar.json_schema(PERSON))
    again = compiler.compile(Grammar.json_schema(json.dumps(PERSON)))
    assert again.compiled is first.compiled and compiler.num_compiled == 1
    compiler.compile(Grammar.regex("[ab]+"))
    assert compiler.num_compiled == 2
    with pytest.raises(InvalidRequestError, match="regex"):
        compiler.compile(Grammar.regex("(unclosed"))


def test_matcher_masks_and_advances(compiler):
    tokenizer = compiler._tokenizer
    grammar = compiler.compile(Grammar.choice(["yes", "no"]))
    matcher, other = grammar.compiled.new_matcher(), grammar.compiled.new_matcher()
    logits = torch.zeros(tokenizer.vocab_size + 64)  # the model's rows may be padded
    matcher.mask_logits(logits)
    allowed = set(torch.nonzero(logits == 0).flatten().tolist())
    assert allowed and all(tokenizer.decode([t]) in ("y", "ye", "yes", "n", "no") for t in allowed)
    end_of_turn = tokenizer.vocab_size - 1
    for token in tokenizer.encode("yes", add_special_tokens=False):
        matcher.accept(token)
    logits = torch.zeros(tokenizer.vocab_size)
    matcher.mask_logits(logits, end_ids=[end_of_turn])
    allowed = set(torch.nonzero(logits == 0).flatten().tolist())
    assert allowed == {*tokenizer.eos_token_ids, end_of_turn}  # complete: only the end
    fresh = torch.zeros(tokenizer.vocab_size)
    other.mask_logits(fresh)  # a second request's matcher starts at the start
    assert (fresh == 0).sum() > 1
