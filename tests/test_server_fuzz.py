"""Fuzzing the HTTP API: request bodies drawn from the server's own OpenAPI schema, each field
either well-typed or any JSON at all, plus random methods, paths and raw bodies. No answer may be
a 5xx (or a mid-stream server error), and every answer must come back in time (no hang).

Generation lengths are kept short so a valid request costs milliseconds: max_tokens and
max_completion_tokens are always present and tiny, or invalid.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_fixtures import MODEL_NAME, SHARED_ARGS, shared_server_fixture

server = shared_server_fixture(*SHARED_ARGS)

TIMEOUT_S = 120.0  # far above any legal request here; reaching it is a hang
HEALTH_LATENCY_S = 5.0  # the event loop is never blocked for long

JSON_SCALAR = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
)
ANY_JSON = st.recursive(
    JSON_SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
JSON_DICT = st.dictionaries(st.text(max_size=6), ANY_JSON, max_size=3)
WRONG_TYPES = (
    st.text(max_size=5)
    | st.booleans()
    | st.floats(allow_nan=False)
    | st.lists(st.integers(), max_size=2)
)
EDGE_INTS = st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30])
EDGE_FLOATS = st.sampled_from([0.0, -0.0, 1e-300, 1e-45, 1e300, 2.0, 100.0, -1e300])
ROLES = st.sampled_from(["system", "user", "assistant", "developer", "tool"]) | st.text(max_size=8)

TOKEN_ID = st.integers(0, 49_151) | st.integers(-5, 60_000)
PROMPT = (
    st.text(min_size=1, max_size=40)
    | st.lists(TOKEN_ID, min_size=1, max_size=16)
    | st.lists(st.text(max_size=20), max_size=3)
    | st.lists(st.lists(TOKEN_ID, max_size=8), max_size=3)
)
CONTENT = st.text(max_size=40) | st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "text", "image_url"])},
        optional={"text": st.text(max_size=20)},
    ),
    max_size=2,
)
MESSAGE = st.fixed_dictionaries(
    {"role": ROLES, "content": CONTENT}, optional={"name": st.text(max_size=5)}
)
SMALL_FLOAT = st.floats(-0.5, 2.5) | EDGE_FLOATS

# Plausible values per field: mostly legal, with the edges of each range. Lengths stay tiny
# (max_tokens and max_completion_tokens are always present) so a legal request is quick.
PLAUSIBLE = {
    "model": st.just(MODEL_NAME) | st.just(MODEL_NAME) | st.none() | st.text(max_size=10),
    "prompt": PROMPT,
    "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    "max_tokens": st.integers(1, 4) | st.integers(-2, 0) | EDGE_INTS,
    "max_completion_tokens": st.integers(1, 4) | st.integers(-2, 0) | EDGE_INTS,
    "n": st.integers(1, 3) | st.sampled_from([0, -1, 129]),
    "min_tokens": st.integers(0, 6) | EDGE_INTS,
    "best_of": st.none() | st.integers(-1, 3),
    "temperature": st.none() | SMALL_FLOAT,
    "top_p": st.none() | st.floats(0, 1.2) | EDGE_FLOATS,
    "min_p": st.none() | st.floats(-0.1, 1.1) | EDGE_FLOATS,
    "top_k": st.none() | st.integers(-2, 60_000) | EDGE_INTS,
    "repetition_penalty": st.none() | SMALL_FLOAT,
    "presence_penalty": st.floats(-2.5, 2.5) | EDGE_FLOATS,
    "frequency_penalty": st.floats(-2.5, 2.5) | EDGE_FLOATS,
    "logprobs": st.none() | st.booleans() | st.integers(-1, 21),
    "top_logprobs": st.none() | st.integers(-1, 21),
    "stop": st.none() | st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
    "stop_token_ids": st.none() | st.lists(TOKEN_ID | EDGE_INTS, max_size=3),
    "seed": st.none() | st.integers(-(2**63), 2**63 - 1) | EDGE_INTS,
    "logit_bias": st.none()
    | st.just({})
    | st.dictionaries(st.text(max_size=3), SMALL_FLOAT, max_size=2),
    "priority": st.integers(-5, 5) | EDGE_INTS,
    # Structured outputs and tools: mostly legal, so the grammar paths run.
    "response_format": st.none()
    | st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}])
    | st.builds(
        lambda schema, strict: {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema, "strict": strict},
        },
        st.sampled_from(
            [
                {"type": "object"},
                {"type": "integer", "minimum": 3},
                {"enum": [1, "a"]},
                {"type": "array", "uniqueItems": True},
                {"type": "bogus"},
            ]
        )
        | JSON_DICT,
        st.none() | st.booleans(),
    ),
    "guided_choice": st.none() | st.lists(st.text(max_size=6), max_size=3),
    "guided_regex": st.none()
    | st.sampled_from(["[a-c]{2}", "(", "\\d+", ""])
    | st.text(max_size=6),
    "tools": st.none()
    | st.lists(
        st.builds(
            lambda name, params: {
                "type": "function",
                "function": {"name": name, "parameters": params},
            },
            st.sampled_from(["f", "get_x", "bad name", ""]),
            st.none() | JSON_DICT,
        ),
        max_size=2,
    ),
    "tool_choice": st.none()
    | st.sampled_from(["none", "auto", "required", "other"])
    | st.just({"type": "function", "function": {"name": "f"}}),
}


def from_schema(schema: dict, defs: dict) -> st.SearchStrategy:
    """Values that fit a JSON schema (the subset pydantic emits), with edge values mixed in."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "integer":
        return st.integers(-3, 40) | EDGE_INTS
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False) | EDGE_FLOATS
    if kind == "string":
        return st.text(max_size=20)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), defs), max_size=3)
    if kind == "object" and "properties" in schema:
        return object_strategy(schema, defs)
    if kind == "object":
        return st.dictionaries(st.text(max_size=8), ANY_JSON, max_size=3)
    return ANY_JSON


def object_strategy(schema: dict, defs: dict, forced: tuple[str, ...] = ()) -> st.SearchStrategy:
    """Objects of the schema's shape; at most one field is then replaced by any JSON at all."""
    props = schema["properties"]
    required = set(schema.get("required", ())) | set(forced)

    def field(name: str) -> st.SearchStrategy:
        return PLAUSIBLE[name] if name in PLAUSIBLE else from_schema(props[name], defs)

    shaped = st.fixed_dictionaries(
        {name: field(name) for name in props if name in required},
        optional={name: field(name) for name in props if name not in required},
    )
    corruption = st.none() | st.none() | st.tuples(st.sampled_from(sorted(props)), ANY_JSON)
    return st.tuples(shaped, corruption).map(_corrupt)


def _corrupt(pair: tuple[dict, tuple | None]) -> dict:
    body, corruption = pair
    if corruption is not None and corruption[0] not in ("max_tokens", "max_completion_tokens"):
        body = {**body, corruption[0]: corruption[1]}
    return body


@pytest.fixture(scope="module")
def strategies(server):
    spec = httpx.get(server.url("/openapi.json")).json()
    defs = spec["components"]["schemas"]
    completion = object_strategy(defs["CompletionRequest"], defs, forced=("max_tokens",))
    chat = object_strategy(defs["ChatCompletionRequest"], defs, forced=("max_completion_tokens",))
    return {
        "/v1/completions": completion | completion | completion | ANY_JSON,
        "/v1/chat/completions": chat | chat | chat | ANY_JSON,
    }


def check_response(response: httpx.Response, body_text: str) -> None:
    status = response.status_code
    assert status < 500, f"{status} for {body_text}: {response.text[:500]}"
    if status >= 400:
        error = response.json()["error"]
        assert error["message"] and set(error) == {"message", "type", "param", "code"}
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in response.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]", f"stream did not end for {body_text}"
        for event in events[:-1]:
            payload = json.loads(event[len("data: ") :])
            assert payload.get("error", {}).get("type") != "server_error", (body_text, payload)
    else:
        assert "choices" in response.json()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzz_generation_endpoints(server, strategies, path):
    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=strategies[path])
    def run(body):
        raw = json.dumps(body)  # Python writes Infinity for inf: not JSON, but servers see it
        response = httpx.post(
            server.url(path),
            content=raw,
            headers={"Content-Type": "application/json"},
            timeout=TIMEOUT_S,
        )
        check_response(response, raw[:300])

    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:  # /health answers promptly all through the run
        while not done.wait(0.5):
            start = time.monotonic()
            httpx.get(server.url("/health"), timeout=TIMEOUT_S)
            latencies.append(time.monotonic() - start)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        run()
    finally:
        done.set()
        prober.join()
    assert httpx.get(server.url("/health")).status_code == 200
    assert latencies and max(latencies) < HEALTH_LATENCY_S, max(latencies)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=st.sampled_from(
        ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"]
    )
    | st.text(alphabet="abcdefghijklmnopqrstuvwxyz/_-.%0123456789", max_size=20).map(
        lambda p: "/v1/" + p
    ),
    body=st.binary(max_size=300) | ANY_JSON.map(lambda v: json.dumps(v).encode()),
    content_type=st.sampled_from(["application/json", "text/plain", None]),
)
def test_fuzz_raw_requests(server, method, path, body, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = httpx.request(
        method, server.url(path), content=body, headers=headers, timeout=TIMEOUT_S
    )
    assert response.status_code < 500, (method, path, body[:100], response.text[:300])
