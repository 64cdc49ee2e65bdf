"""Tool calling with the official client: a round trip (call, tool result, final answer) whole
and streamed, a named tool_choice, parallel_tool_calls, tool_choice errors; and the reply
parser and stream splitter on their own."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server_fixtures import MODEL_NAME, SHARED_ARGS, shared_server_fixture
from tokenmill.server.tool_calls import ToolCallStream, parse_reply

server = shared_server_fixture(*SHARED_ARGS)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def streamed_calls(stream) -> tuple[dict[int, dict], str | None, str]:
    """Tool calls accumulated from deltas as OpenAI's streaming clients do."""
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return calls, finish, content


@pytest.mark.parametrize("stream", [False, True])
def test_round_trip_call_result_answer(server, stream):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, tools=[WEATHER, TIME], tool_choice="required",
                  parallel_tool_calls=False, max_tokens=60, temperature=0)  # fmt: skip
    if stream:
        calls, finish, content = streamed_calls(
            client.chat.completions.create(messages=QUESTION, stream=True, **kwargs)
        )
        assert content == "" and len(calls) == 1
        call = calls[0]
    else:
        out = client.chat.completions.create(messages=QUESTION, **kwargs)
        message, finish = out.choices[0].message, out.choices[0].finish_reason
        assert message.content is None and len(message.tool_calls) == 1
        fn = message.tool_calls[0].function
        call = {"id": message.tool_calls[0].id, "name": fn.name, "arguments": fn.arguments}
    assert finish == "tool_calls"
    assert call["name"] in ("get_weather", "get_time") and call["id"].startswith("call_")
    if call["name"] == "get_weather":
        assert isinstance(json.loads(call["arguments"])["city"], str)
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "22 C and sunny"},
    ]  # fmt: skip
    answer = client.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=[WEATHER, TIME], max_tokens=30, temperature=0
    )
    assert answer.choices[0].message.content and answer.choices[0].finish_reason != "tool_calls"


def test_named_tool_choice_calls_that_function_once(server):
    out = server.client().chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, tools=[TIME, WEATHER], max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0,
    )  # fmt: skip
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
    assert out.choices[0].finish_reason == "stop"  # as OpenAI ends a forced call


def test_tool_choice_none_and_errors(server):
    client = server.client()
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, tools=[WEATHER], tool_choice="none", max_tokens=8
    )
    assert out.choices[0].message.tool_calls is None
    url = server.url("/v1/chat/completions")
    named = {"type": "function", "function": {"name": "nope"}}
    for body in (
        {"tool_choice": "required"},
        {"tools": [WEATHER], "tool_choice": named},
        {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
    ):
        r = httpx.post(url, json={"messages": QUESTION, "max_tokens": 4, **body}, timeout=60)
        assert r.status_code == 400, (body, r.text)


REPLY = (
    'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
    '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>'
)


def test_parse_reply():
    reply = parse_reply(REPLY)
    assert reply.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in reply.tool_calls] == [
        ("a", {"x": 1}),
        ("b", {}),
    ]
    assert len(parse_reply(REPLY, parallel=False).tool_calls) == 1
    broken = "<tool_call>\n{not json}\n</tool_call> ok"
    assert parse_reply(broken).content == broken and not parse_reply(broken).tool_calls


@pytest.mark.parametrize("piece", [1, 3, 7, len(REPLY)])
def test_tool_call_stream_matches_parse(piece):
    stream = ToolCallStream()
    content, calls = "", []
    for i in range(0, len(REPLY), piece):
        text, new = stream.feed(REPLY[i : i + piece])
        content, calls = content + text, calls + new
    text, new = stream.finish()
    content, calls = content + text, calls + new
    whole = parse_reply(REPLY)
    assert content.strip() == whole.content
    assert [c.function for c in calls] == [c.function for c in whole.tool_calls]
