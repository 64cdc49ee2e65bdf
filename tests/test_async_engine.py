"""AsyncEngine over the real model: streaming, errors in the caller, abort on break / cancel
(KV blocks freed), fault isolation of the loop thread, idling without stepping, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time

import pytest

from tokenmill.engine.async_engine import AsyncEngine, EngineInternalError, EngineStoppedError
from tokenmill.engine.build import engine_sharing_weights
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.errors import ContextLengthError, EngineOverloadedError, InvalidRequestError
from tokenmill.outputs import OutputKind
from tokenmill.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)


def make_engine(llm_fp32, **scheduler) -> LLMEngine:
    """A fresh engine over the session's loaded weights (its own runner and KV cache)."""
    base = llm_fp32.engine
    config = dataclasses.replace(
        base.config, scheduler=dataclasses.replace(base.config.scheduler, **scheduler)
    )
    return engine_sharing_weights(base, config)


@pytest.fixture
def engine(llm_fp32):
    async_engine = AsyncEngine(make_engine(llm_fp32))
    yield async_engine
    async_engine.close()


async def collect(engine: AsyncEngine, request_id: str, prompt, params=GREEDY):
    return [out async for out in engine.generate(request_id, prompt, params)]


def all_token_ids(outs) -> list[int]:
    """The first sample's tokens from a request's DELTA outputs."""
    return sum((o.outputs[0].token_ids for o in outs), [])


async def wait_idle(engine: AsyncEngine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = engine.stats()
        idle = stats.engine.num_running == 0 and stats.engine.kv_cache_usage == 0
        if stats.num_streams == 0 and idle:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


def test_generate_streams_deltas_that_add_up(engine, llm_fp32):
    outs = asyncio.run(collect(engine, "a", "Hello, my name is"))
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    assert all(len(o.outputs[0].token_ids) == 1 for o in outs)  # one new token per step
    text = "".join(o.outputs[0].text for o in outs)
    token_ids = all_token_ids(outs)
    alone = llm_fp32.generate(["Hello, my name is"], GREEDY, use_tqdm=False)[0].outputs[0]
    assert (text, token_ids) == (alone.text, alone.token_ids)


def test_generate_final_only_and_cumulative(engine, llm_fp32):
    async def main():
        final = [o async for o in engine.generate("f", "Hi", GREEDY, 0, OutputKind.FINAL_ONLY)]
        cumulative = [o async for o in engine.generate("c", "Hi", GREEDY, 0, OutputKind.CUMULATIVE)]
        return final, cumulative

    final, cumulative = asyncio.run(main())
    alone = llm_fp32.generate(["Hi"], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(final) == 1 and final[0].outputs[0].token_ids == alone.token_ids
    assert [len(o.outputs[0].token_ids) for o in cumulative] == list(range(1, 9))
    assert cumulative[-1].outputs[0].text == alone.text


def test_concurrent_requests_match_sequential(engine):
    prompts = [f"Tell me about the number {i}." for i in range(6)]

    async def main():
        together = await asyncio.gather(
            *(collect(engine, f"c{i}", p) for i, p in enumerate(prompts))
        )
        alone = [await collect(engine, f"s{i}", p) for i, p in enumerate(prompts)]
        return together, alone

    together, alone = asyncio.run(main())
    assert [all_token_ids(t) for t in together] == [all_token_ids(a) for a in alone]


def test_add_errors_raise_in_caller(engine):
    async def main():
        with pytest.raises(InvalidRequestError, match="out of range"):
            await engine.add_request("bad", [10**9], GREEDY)
        with pytest.raises(ContextLengthError, match="context"):
            await engine.add_request("long", [1] * 10_000, GREEDY)
        stream = await engine.add_request("dup", "Hi", LONG)
        with pytest.raises(InvalidRequestError, match="already in use"):
            await engine.add_request("dup", "Hi", GREEDY)
        first = await stream.__anext__()  # the first request is unaffected
        assert first.request_id == "dup"
        stream.abort()
        await wait_idle(engine)

    asyncio.run(main())


def test_overloaded_queue_raises(llm_fp32):
    engine = AsyncEngine(make_engine(llm_fp32, max_num_seqs=1, max_waiting=1))
    try:

        async def main():
            running = await engine.add_request("r", "Hi", LONG)
            await running.__anext__()  # scheduled: it left the waiting queue
            waiting = await engine.add_request("w", "Hi", LONG)
            with pytest.raises(EngineOverloadedError, match="waiting queue is full"):
                await engine.add_request("x", "Hi", LONG)
            running.abort()
            waiting.abort()
            await wait_idle(engine)

        asyncio.run(main())
    finally:
        engine.close()


def test_break_aborts_and_frees_kv_blocks(engine):
    async def main():
        gen = engine.generate("b", "Once upon a time", LONG)
        num_tokens = 0
        async with contextlib.aclosing(gen):
            async for out in gen:
                num_tokens += len(out.outputs[0].token_ids)
                if num_tokens >= 3:
                    break
        await wait_idle(engine, timeout_s=2.0)

    asyncio.run(main())


def test_cancelled_consumer_aborts(engine):
    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate("c", "Once upon a time", LONG):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(engine, timeout_s=2.0)

    asyncio.run(main())


def test_step_fault_fails_in_flight_requests_and_the_loop_survives(engine):
    real_step = engine.engine.step
    calls = {"n": 0}

    def faulty_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        return real_step()

    engine.engine.step = faulty_step

    async def main():
        with pytest.raises(EngineInternalError, match="injected fault"):
            await collect(engine, "f", "Hello", LONG)
        outs = await collect(engine, "g", "Hello")
        assert outs[-1].finished and len(all_token_ids(outs)) == 8

    asyncio.run(main())
    assert engine.is_running


def test_idle_loop_does_not_step(engine):
    asyncio.run(collect(engine, "i", "Hi"))
    asyncio.run(wait_idle(engine))  # the snapshot after the last step
    steps = engine.stats().engine.num_model_steps
    time.sleep(0.3)
    assert engine.stats().engine.num_model_steps == steps
    loop_thread = [t for t in threading.enumerate() if t.name == "tokenmill-engine"]
    assert loop_thread and all(t.is_alive() for t in loop_thread)


def test_outputs_reach_the_loop_that_asked(engine):
    """Requests from two event loops (two threads) each get their own outputs."""
    results: dict[str, list[int]] = {}

    def run(name: str) -> None:
        outs = asyncio.run(collect(engine, name, "The sky is"))
        results[name] = all_token_ids(outs)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results["x"] == results["y"] and len(results["x"]) == 8


def test_shutdown_lets_in_flight_requests_finish(engine):
    async def main():
        short = asyncio.create_task(collect(engine, "short", "Hi"))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        await engine.shutdown(timeout_s=120.0)
        assert time.monotonic() - start < 60  # returned once the request finished
        outs = await short
        assert outs[-1].finished and len(all_token_ids(outs)) == 8
        with pytest.raises(EngineStoppedError):
            await engine.add_request("late", "Hi", GREEDY)

    asyncio.run(main())
    assert not engine.is_running


def test_shutdown_aborts_what_is_left_at_the_deadline(engine):
    async def main():
        stream = await engine.add_request("long", "Hi", LONG)
        await stream.__anext__()
        start = time.monotonic()
        await engine.shutdown(timeout_s=0.5)
        assert time.monotonic() - start < 10
        with pytest.raises(EngineStoppedError):
            async for _ in stream:
                pass

    asyncio.run(main())
    assert not engine.is_running and engine.stats().num_streams == 0
    assert engine.stats().engine.kv_cache_usage == 0


def test_engine_built_on_its_own_thread_serves_and_load_errors_raise_in_the_caller(llm_fp32):
    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return make_engine(llm_fp32)

    engine = AsyncEngine(build=build)
    try:
        assert built_on == ["tokenmill-engine"]
        outs = asyncio.run(collect(engine, "built", [1, 2, 3]))
        assert len(all_token_ids(outs)) == GREEDY.max_tokens
    finally:
        engine.close()

    def broken():
        raise FileNotFoundError("no such model: /nonexistent.gguf")

    with pytest.raises(FileNotFoundError, match="nonexistent.gguf"):
        AsyncEngine(build=broken)
    with pytest.raises(ValueError, match="exactly one"):
        AsyncEngine()
    with pytest.raises(ValueError, match="exactly one"):
        AsyncEngine(make_engine(llm_fp32), build=build)
