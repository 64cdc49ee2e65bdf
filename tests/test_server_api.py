"""The OpenAI API over a real socket with the official client: completions and chat, streamed
and not, usage, n, stop, logprobs, echo, the vLLM extras, /v1/models, /health, /metrics."""

from __future__ import annotations

import httpx
import pytest

from tests.server_fixtures import MODEL_NAME, SHARED_ARGS, shared_server_fixture

server = shared_server_fixture(*SHARED_ARGS)

PROMPT = "The capital of France is"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name three colours."},
]


def stream_completion(client, **kwargs) -> tuple[dict[int, str], dict[int, str | None], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    for chunk in client.completions.create(stream=True, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


def stream_chat(client, **kwargs) -> tuple[dict[int, str], dict[int, str | None], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    usage = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


def test_health_and_models(server):
    assert httpx.get(server.url("/health")).json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert server.client().models.retrieve(MODEL_NAME).id == MODEL_NAME


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 1234}])
def test_completion_streamed_equals_whole(server, sampling):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, **sampling)
    whole = client.completions.create(**kwargs)
    texts, reasons, usage = stream_completion(
        client, stream_options={"include_usage": True}, **kwargs
    )
    assert whole.object == "text_completion" and whole.model == MODEL_NAME
    assert whole.choices[0].text and texts[0] == whole.choices[0].text
    assert reasons[0] == whole.choices[0].finish_reason
    assert usage.model_dump() == whole.usage.model_dump()


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "seed": 7}])
def test_chat_streamed_equals_whole(server, sampling):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=16, **sampling)
    whole = client.chat.completions.create(**kwargs)
    texts, reasons, usage = stream_chat(client, stream_options={"include_usage": True}, **kwargs)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content and texts[0] == whole.choices[0].message.content
    assert reasons[0] == whole.choices[0].finish_reason
    assert usage.model_dump() == whole.usage.model_dump()


def test_usage_counts(server):
    client = server.client()
    prompt_ids = [504, 3575, 282, 4649, 314]
    out = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt_ids,
        max_tokens=9,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == 9 == len(out.choices[0].logprobs.tokens)
    assert out.usage.total_tokens == len(prompt_ids) + 9
    assert out.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=5, temperature=0
    )
    assert 1 <= chat.usage.completion_tokens <= 5
    assert chat.usage.prompt_tokens > 10  # the template's system and role markers count too
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_n2_streamed_and_whole(server):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, temperature=1.0, seed=3, n=2)
    whole = client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in whole.choices) == [0, 1]
    texts, _, _ = stream_chat(client, **kwargs)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert whole.choices[0].message.content != whole.choices[1].message.content
    comp = client.completions.create(
        model=MODEL_NAME, prompt=[PROMPT, "Once upon a time"], max_tokens=4, temperature=0, n=2
    )
    assert sorted(c.index for c in comp.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in comp.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy: samples agree


def test_n3_streams_each_finish_once_with_whole_usage(server):
    # Samples that stop at different steps: every chunk carries only news, each choice's
    # finish comes once, and the streamed usage adds the deltas up to the whole response's.
    client = server.client()
    kwargs = dict(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=24, temperature=1.0, seed=5, n=3,
        stop=[" ", ","],
    )  # fmt: skip
    whole = client.chat.completions.create(**kwargs)
    finishes: dict[int, int] = {}
    texts: dict[int, str] = {}
    usage = None
    stream = client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs
    )
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            finishes[choice.index] = finishes.get(choice.index, 0) + (
                choice.finish_reason is not None
            )
    assert finishes == {0: 1, 1: 1, 2: 1}
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert usage.model_dump() == whole.usage.model_dump()
    completion = dict(kwargs, prompt=PROMPT, stop=[" the", ","])
    del completion["messages"]
    whole = client.completions.create(**completion)
    finishes, texts = {}, {}
    stream = client.completions.create(
        stream=True, stream_options={"include_usage": True}, **completion
    )
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            finishes[choice.index] = finishes.get(choice.index, 0) + (
                choice.finish_reason is not None
            )
    assert finishes == {0: 1, 1: 1, 2: 1}
    assert texts == {c.index: c.text for c in whole.choices}
    assert usage.model_dump() == whole.usage.model_dump()


def test_stop_string(server):
    client = server.client()
    base = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0)
    text = base.choices[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    cut = text[: text.index(stop)]
    out = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop]
    )
    assert out.choices[0].text == cut
    assert out.choices[0].finish_reason == "stop"
    texts, reasons, _ = stream_completion(
        client, model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop
    )
    assert texts[0] == cut and reasons[0] == "stop"


def test_completion_logprobs_and_echo(server):
    client = server.client()
    out = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(chosen)  # greedy picks the most likely
    echo = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1, echo=True
    )
    choice = echo.choices[0]
    assert choice.text == PROMPT + out.choices[0].text
    assert choice.logprobs.token_logprobs[0] is None
    assert all(v <= 0 for v in choice.logprobs.token_logprobs[1:])
    assert choice.logprobs.tokens[-5:] == lp.tokens
    streamed, _, _ = stream_completion(
        client, model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, echo=True
    )
    assert streamed[0] == choice.text


def test_chat_logprobs(server):
    client = server.client()
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    content = out.choices[0].logprobs.content
    assert 1 <= len(content) <= 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.bytes == list(entry.token.encode())
    streamed = []
    for chunk in client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=3, stream=True,
    ):  # fmt: skip
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed += [e.token for e in choice.logprobs.content]
    assert streamed == [e.token for e in content]


def test_vllm_extra_fields_priority_and_user(server):
    client = server.client()
    out = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0.8,
        seed=11,
        user="someone",
        extra_body={
            "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True,
            "min_tokens": 8, "priority": 1,
        },
    )  # fmt: skip
    assert out.usage.completion_tokens == 8
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=4, temperature=0, user="x",
        extra_body={"top_k": 5, "min_tokens": 4, "priority": -3},
    )  # fmt: skip
    assert chat.usage.completion_tokens == 4


def test_raw_sse_framing(server):
    body = {
        "model": MODEL_NAME,
        "prompt": PROMPT,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_metrics_exposed(server):
    server.client().completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    text = httpx.get(server.url("/metrics")).text
    for name in (
        "tokenmill:num_requests_running", "tokenmill:num_requests_waiting",
        "tokenmill:kv_cache_usage_perc", "tokenmill:prefix_cache_queries_total",
        "tokenmill:prefix_cache_hits_total", "tokenmill:prompt_tokens_total",
        "tokenmill:generation_tokens_total", "tokenmill:num_preemptions_total",
        "tokenmill:time_to_first_token_seconds_bucket",
        "tokenmill:inter_token_latency_seconds_bucket",
        "tokenmill:e2e_request_latency_seconds_bucket",
        'tokenmill:request_success_total{finished_reason="length"',
    ):  # fmt: skip
        assert name in text, name
    metrics = server.metrics()
    assert metrics["tokenmill:generation_tokens_total"] > 0
    assert metrics["tokenmill:time_to_first_token_seconds_count"] > 0
    # Engine time: prompt steps within all steps within the loop iterations that ran them.
    assert metrics["tokenmill:engine_steps_total"] >= 2
    prompt, steps, loop = (
        metrics[f"tokenmill:engine_{name}_seconds_total"]
        for name in ("prompt_step", "step", "loop")
    )
    assert 0 < prompt < steps < loop
