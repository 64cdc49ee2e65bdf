"""OpenAI compatibility details that clients nobody here wrote rely on: explicit nulls, prompt
scoring (max_tokens 0 + echo + logprobs), chat logprobs that join to the content, the message
and delta shapes, roles, tool-call history, chat_template_kwargs, and validation errors that
stay fast and short whatever the client sends."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.server_fixtures import MODEL_NAME, SHARED_ARGS, shared_server_fixture

server = shared_server_fixture(*SHARED_ARGS)

USER = [{"role": "user", "content": "Name three colours."}]
CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"


def post(server, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(server.url(path), json=body, timeout=timeout)


def test_explicit_nulls_mean_defaults(server):
    nulls = {"n": None, "stream": None, "presence_penalty": None, "frequency_penalty": None}
    r = post(server, CMPL, {"prompt": None, "echo": None, "max_tokens": 3, **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 1  # null prompt: the document boundary
    r = post(server, CHAT, {"messages": USER, "logprobs": None, "max_tokens": 3, **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"] is None


def test_prompt_scoring_with_max_tokens_0(server):
    prompt = "The capital of France is Paris"
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    choice = post(server, CMPL, body).json()["choices"][0]
    assert choice["text"] == prompt
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == prompt and lp["token_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    events = httpx.post(server.url(CMPL), json={**body, "stream": True}, timeout=120).text
    chunks = [json.loads(e[6:]) for e in events.split("\n\n") if e.startswith("data: {")]
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert streamed == prompt
    tokens = [t for c in chunks if c["choices"] for t in c["choices"][0]["logprobs"]["tokens"]]
    assert tokens == lp["tokens"]


def test_chat_logprobs_join_to_content(server):
    client = server.client()
    messages = [{"role": "user", "content": "What is 2+2?"}]  # a 12-token reply
    kwargs = dict(model=MODEL_NAME, messages=messages, max_tokens=40, temperature=0, logprobs=True)
    out = client.chat.completions.create(**kwargs)
    assert out.choices[0].finish_reason == "stop"  # ended by the end-of-turn token
    content = out.choices[0].logprobs.content
    assert "".join(e.token for e in content) == out.choices[0].message.content
    assert len(content) == out.usage.completion_tokens - 1
    streamed = [
        e.token
        for chunk in client.chat.completions.create(stream=True, **kwargs)
        for choice in chunk.choices
        if choice.logprobs is not None
        for e in choice.logprobs.content
    ]
    assert streamed == [e.token for e in content]


def test_message_and_delta_shapes(server):
    r = post(server, CHAT, {"messages": USER, "max_tokens": 3})
    message = r.json()["choices"][0]["message"]
    assert message["refusal"] is None and "refusal" in message
    assert "tool_calls" not in message  # only when there are calls
    events = httpx.post(
        server.url(CHAT), json={"messages": USER, "max_tokens": 4, "stream": True}, timeout=120
    ).text
    deltas = [
        json.loads(e[6:])["choices"][0]["delta"]
        for e in events.split("\n\n")
        if e.startswith("data: {")
    ]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert len(deltas) > 1 and all("role" not in d for d in deltas[1:])
    assert all(None not in d.values() for d in deltas)


@pytest.mark.parametrize("role", ["wizard", "", "System"])
def test_unknown_roles_are_rejected(server, role):
    r = post(server, CHAT, {"messages": [{"role": role, "content": "hi"}]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages[0].role"


def test_developer_role_is_a_system_message(server):
    body = {"max_tokens": 8, "temperature": 0}
    dev = [{"role": "developer", "content": "Be brief."}, *USER]
    system = [{"role": "system", "content": "Be brief."}, *USER]
    replies = [post(server, CHAT, {"messages": m, **body}).json() for m in (dev, system)]
    assert replies[0]["usage"] == replies[1]["usage"]
    assert replies[0]["choices"][0]["message"] == replies[1]["choices"][0]["message"]


@pytest.mark.parametrize("key", ["template", "self", "messages", "not an identifier"])
def test_chat_template_kwargs_reserved_names_400(server, key):
    r = post(server, CHAT, {"messages": USER, "chat_template_kwargs": {key: "x"}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "chat_template_kwargs"


def test_tool_call_history_is_rendered(server):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"},
    ]
    r = post(server, CHAT, {"messages": messages, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    # The call and the result reach the model: the prompt is longer than without them.
    shorter = post(server, CHAT, {"messages": messages[:1], "max_tokens": 4, "temperature": 0})
    assert r.json()["usage"]["prompt_tokens"] > shorter.json()["usage"]["prompt_tokens"] + 20


def test_validation_error_of_a_huge_key_is_fast_and_short(server):
    # A regular expression over pydantic's error path took time quadratic in the key (54 s
    # for this one) on the event loop, and the message echoed the whole key.
    body = {"prompt": "hi", "logit_bias": {"[" * 320_000: "x"}}
    health: list[float] = []

    def probe() -> None:
        start = time.monotonic()
        httpx.get(server.url("/health"), timeout=60)
        health.append(time.monotonic() - start)

    start = time.monotonic()
    thread = threading.Thread(target=probe)
    thread.start()
    r = post(server, CMPL, body)
    elapsed = time.monotonic() - start
    thread.join()
    assert r.status_code == 400
    assert len(r.text) < 1000 and len(r.json()["error"]["param"]) <= 200
    assert elapsed < 10 and health[0] < 10, (elapsed, health)
