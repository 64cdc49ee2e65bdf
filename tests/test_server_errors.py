"""Every bad input gets its status and a message naming the problem, in OpenAI's error JSON,
while a long request served at the same time completes unharmed. Also 401, 413 and 429."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import httpx
import openai
import pytest

from tests.server_fixtures import API_KEY, MODEL_NAME, server_fixture, wait_for

MAX_BODY = 65536
MAX_CONNECTIONS = 12
server = server_fixture(
    "--max-num-seqs", "2", "--max-queue", "2", "--max-body-bytes", str(MAX_BODY),
    "--kv-cache-memory", "0.25", "--header-timeout", "1", "--body-timeout", "1",
    "--max-connections", str(MAX_CONNECTIONS), api_key=API_KEY,
)  # fmt: skip

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

# (path, body, status, words the message must contain, param)
BAD_INPUTS = [
    (CMPL, '{"prompt": "hi", ', 400, ["malformed JSON"], None),
    (CMPL, "[1, 2]", 400, ["JSON object"], None),
    (CMPL, {}, 400, ["prompt", "required"], "prompt"),
    (CMPL, {"prompt": 12}, 400, ["prompt"], "prompt"),
    (CMPL, {"prompt": []}, 400, ["prompt", "empty"], "prompt"),
    (CMPL, {"prompt": [-1]}, 400, ["token id", "out of range"], "prompt"),
    (CMPL, {"prompt": [10**9]}, 400, ["token id", "out of range"], "prompt"),
    (CMPL, {"prompt": "hi", "temperature": "hot"}, 400, ["temperature", "number"], "temperature"),
    (CMPL, {"prompt": "hi", "temperature": -0.5}, 400, ["temperature", ">= 0"], "temperature"),
    (CMPL, {"prompt": "hi", "top_p": 1.5}, 400, ["top_p"], "top_p"),
    (CMPL, {"prompt": "hi", "top_k": -5}, 400, ["top_k"], "top_k"),
    (CMPL, {"prompt": "hi", "min_p": 2}, 400, ["min_p"], "min_p"),
    (CMPL, {"prompt": "hi", "repetition_penalty": 0}, 400, ["repetition_penalty"],
     "repetition_penalty"),
    (CMPL, {"prompt": "hi", "n": 0}, 400, ["n must be"], "n"),
    (CMPL, {"prompt": "hi", "n": 1.5}, 400, ["'n'"], "n"),
    (CMPL, {"prompt": "hi", "n": 3}, 400, ["n (3)", "--max-queue"], "n"),  # can never fit
    (CMPL, {"prompt": ["a", "b"], "n": 2}, 400, ["n x prompts (4)"], "n"),
    (CMPL, {"prompt": "hi", "max_tokens": 0}, 400, ["max_tokens"], "max_tokens"),
    (CMPL, {"prompt": "hi", "max_tokens": "many"}, 400, ["max_tokens"], "max_tokens"),
    (CMPL, {"prompt": "hi", "min_tokens": 9, "max_tokens": 5}, 400, ["min_tokens"], "min_tokens"),
    (CMPL, {"prompt": "hi", "logprobs": 21}, 400, ["logprobs"], "logprobs"),
    (CMPL, {"prompt": "hi", "stop": 5}, 400, ["stop"], "stop"),
    (CMPL, {"prompt": "hi", "stop": [""]}, 400, ["stop", "non-empty"], "stop"),
    (CMPL, {"prompt": "hi", "seed": "x"}, 400, ["seed"], "seed"),
    (CMPL, {"prompt": "hi", "seed": 2**70}, 400, ["seed"], "seed"),
    (CMPL, {"prompt": "hi", "stream": "sometimes"}, 400, ["stream"], "stream"),
    (CMPL, {"prompt": "hi", "logit_bias": {"1": 5}}, 400, ["logit_bias"], "logit_bias"),
    (CMPL, {"prompt": "hi", "best_of": 3}, 400, ["best_of"], "best_of"),
    (CMPL, {"prompt": "hi", "model": "gpt-5"}, 404, ["gpt-5", MODEL_NAME], "model"),
    (CHAT, {"messages": []}, 400, ["messages", "empty"], "messages"),
    (CHAT, {"messages": "hello"}, 400, ["messages", "list"], "messages"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, ["role", "required"], "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, ["content"], "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     ["image_url"], "messages[0].content"),
    (CHAT, {"messages": USER, "top_logprobs": 3}, 400, ["top_logprobs", "logprobs"],
     "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 30}, 400, ["top_logprobs"],
     "top_logprobs"),
    (CHAT, {"messages": USER, "model": "nope"}, 404, ["nope"], "model"),
]  # fmt: skip


def context_cases(max_len: int) -> list:
    """Prompt + max_tokens beyond the context window: the message states both numbers."""
    over = max_len + 10
    return [
        (CMPL, {"prompt": "hi", "max_tokens": over}, 400, [str(max_len), str(over + 1), str(over)],
         "max_tokens"),
        (CMPL, {"prompt": [1] * (max_len + 3)}, 400, [str(max_len + 3), str(max_len)], "prompt"),
        (CMPL, {"prompt": [1] * (max_len - 4), "max_tokens": 5}, 400,
         [str(max_len), str(max_len + 1), str(max_len - 4)], "max_tokens"),
        (CHAT, {"messages": USER, "max_completion_tokens": over}, 400, [str(max_len), str(over)],
         "max_completion_tokens"),
    ]  # fmt: skip


def post(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json", **server.headers, **(headers or {})}
    content = body if isinstance(body, str) else None
    return httpx.post(
        server.url(path),
        content=content,
        json=None if content is not None else body,
        headers=headers,
        timeout=60,
    )


def assert_error(response: httpx.Response, status: int, words: list[str], param=None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], (word, error)
    if param is not None:
        assert error["param"] == param, error


LONG_BODY = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
    "max_tokens": 32,
    "temperature": 0,
    "ignore_eos": True,
}


def test_bad_inputs_while_a_long_request_runs(server):
    reference = post(server, CHAT, LONG_BODY).json()["choices"][0]["message"]["content"]
    # The same request, made long enough to outlast the bad inputs whatever the machine's
    # speed: it is still streaming when they are done, then the client leaves.
    long_body = {**LONG_BODY, "max_tokens": 4000, "stream": True}
    text = ""
    with httpx.stream("POST", server.url(CHAT), json=long_body, headers=server.headers,
                      timeout=60) as stream:  # fmt: skip
        lines = stream.iter_lines()
        while len(text) <= len(reference):
            line = next(lines)
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        max_len = server.client().models.list().data[0].model_extra["max_model_len"]
        for path, body, status, words, param in BAD_INPUTS + context_cases(max_len):
            assert_error(post(server, path, body), status, words, param)
        running = server.metrics()["tokenmill:num_requests_running"]
        assert running >= 1, "the long request ended early"
    assert text.startswith(reference)
    assert wait_for(lambda: server.metrics()["tokenmill:num_requests_running"] == 0, 30)


def test_unknown_routes_and_methods(server):
    r = httpx.get(server.url("/v1/nothing"), headers=server.headers)
    assert_error(r, 404, ["/v1/nothing"])
    r = httpx.get(server.url(CMPL), headers=server.headers)
    assert_error(r, 405, ["GET", CMPL])
    assert_error(httpx.get(server.url("/nowhere")), 404, ["/nowhere"])


def test_api_key(server):
    assert_error(httpx.post(server.url(CMPL), json={"prompt": "hi"}), 401, ["API key"])
    wrong = {"Authorization": "Bearer wrong"}
    assert_error(httpx.get(server.url("/v1/models"), headers=wrong), 401, ["incorrect API key"])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url("/health")).status_code == 200  # probes need no key
    assert httpx.get(server.url("/metrics")).status_code == 200
    for scheme in ("bearer", "BEARER", "Bearer"):  # the scheme is case-insensitive (RFC 7235)
        r = httpx.get(server.url("/v1/models"), headers={"Authorization": f"{scheme} {API_KEY}"})
        assert r.status_code == 200, scheme
    for path in ("/docs", "/redoc", "/openapi.json"):  # the API's description needs the key
        assert_error(httpx.get(server.url(path)), 401, ["API key"])
        assert httpx.get(server.url(path), headers=server.headers).status_code == 200


def test_body_too_large(server):
    big = '{"prompt": "' + "a" * MAX_BODY + '"}'
    assert_error(post(server, CMPL, big), 413, [str(MAX_BODY)])

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096].encode()

    r = httpx.post(
        server.url(CMPL),
        content=chunks(),
        headers={**server.headers, "Content-Type": "application/json"},
    )
    assert_error(r, 413, [str(MAX_BODY)])


def test_client_errors_map_to_openai_exceptions(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_NAME, prompt="hi", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4o", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=100_000)


def test_queue_full_gets_429_and_service_recovers(server):
    long = {**LONG_BODY, "max_tokens": 2000, "stream": True}
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(httpx.Client(timeout=300, headers=server.headers))
        for _ in range(4):  # 2 run (--max-num-seqs 2), 2 wait (--max-queue 2)
            response = stack.enter_context(client.stream("POST", server.url(CHAT), json=long))
            assert response.status_code == 200
        assert wait_for(lambda: server.metrics()["tokenmill:num_requests_waiting"] == 2, 30)
        assert_error(post(server, CHAT, LONG_BODY), 429, ["waiting queue is full"])
        with pytest.raises(openai.RateLimitError):
            server.client().chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=2)
    # The four streams are closed: their requests are aborted and the queue drains.
    assert wait_for(lambda: server.metrics()["tokenmill:kv_cache_usage_perc"] == 0, 20)
    r = post(server, CHAT, {"messages": USER, "max_tokens": 2})
    assert r.status_code == 200, r.text


def raw_reply(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_headers_and_slow_bodies_get_408(server):
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port)) as slow_headers:
        slow_headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        reply = raw_reply(slow_headers)
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 8
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port)) as slow_body:
        slow_body.sendall(head.encode() + b'{"prompt": ')
        reply = raw_reply(slow_body)
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 8
    assert b"request body was not received" in reply
    assert httpx.get(server.url("/health")).status_code == 200


def test_connections_over_the_cap_are_refused_then_served_again(server):
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.create_connection(("127.0.0.1", server.port)))
            for _ in range(MAX_CONNECTIONS + 1)
        ]
        time.sleep(0.3)  # well within the 1 s header timeout: the open ones hear nothing
        replies = []
        for sock in socks:
            sock.setblocking(False)
            try:
                replies.append(sock.recv(65536))
            except BlockingIOError:
                replies.append(None)
    refused = [r for r in replies if r is not None]
    assert refused and all(r.startswith(b"HTTP/1.1 503") for r in refused), replies
    assert b"too_many_connections" in refused[0]
    assert replies[0] is None  # the first ones were within the cap
    # The idle ones are closed now: new requests are served.
    assert wait_for(lambda: httpx.get(server.url("/health")).status_code == 200, 10)
