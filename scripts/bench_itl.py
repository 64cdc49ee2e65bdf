"""Inter-token latency through the HTTP server vs the engine's own decode step, at concurrency 1.

    python scripts/bench_itl.py [--tokens 64] [--rounds 3] [MODEL] [engine / serve flags]

Flags it does not know (the model, --dtype, --device, --kv-cache-memory, ...) configure both the
engine it drives directly and the `tokenmill serve` it starts, so both run the same engine.

Measured in the same run, alternating round by round so that background load hits all alike:

  engine decode step   the engine driven directly in this process, on a background thread as the
                       server drives it (wall time of each decode step, the prefill left out)
  step in the server   the server's own engine steps during the streamed request (/metrics:
                       tokenmill:engine_step_seconds_total / tokenmill:engine_steps_total)
  client ITL           the same greedy request streamed from a `tokenmill serve` subprocess by a
                       raw SSE client: the time between consecutive token events it receives

The issue asks for client ITL / engine decode step within 1.15.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
import uuid

import httpx

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from tests.server_fixtures import ServerProcess  # noqa: E402
from tokenmill.cli.engine_args import engine_config_from_args  # noqa: E402
from tokenmill.cli.main import build_parser  # noqa: E402
from tokenmill.engine.build import build_engine  # noqa: E402
from tokenmill.engine.llm_engine import LLMEngine  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def engine_step_times(engine: LLMEngine, num_tokens: int) -> list[float]:
    """Wall time of each decode step of one greedy request (the prefill step is left out)."""
    params = SamplingParams(max_tokens=num_tokens, temperature=0, ignore_eos=True, logprobs=0)
    engine.add_request(uuid.uuid4().hex, PROMPT, params)
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times[1:]


def server_step_time(server: ServerProcess) -> tuple[float, float]:
    metrics = server.metrics()
    return metrics["tokenmill:engine_step_seconds_total"], metrics["tokenmill:engine_steps_total"]


def client_itls(url: str, num_tokens: int) -> list[float]:
    """Gaps between consecutive token events of one streamed request, as the client sees them."""
    body = {
        "prompt": PROMPT, "max_tokens": num_tokens, "temperature": 0, "ignore_eos": True,
        "stream": True, "logprobs": 0,  # a logprob per token: an event even for empty text
    }  # fmt: skip
    arrivals = []
    with httpx.stream("POST", url, json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[len("data: ") :])["choices"]
                if choices and (choices[0]["text"] or choices[0]["logprobs"]):
                    arrivals.append(time.perf_counter())
    return [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]


def summary(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[int(0.9 * (len(ms) - 1))]
    return (
        f"{name:<28} n={len(ms):4d}  median {statistics.median(ms):7.2f} ms  "
        f"mean {statistics.fmean(ms):7.2f} ms  p90 {p90:7.2f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--rounds", type=int, default=3)
    args, engine_flags = parser.parse_known_args()
    engine_flags = engine_flags or ["--kv-cache-memory", "0.25"]
    serve_args = build_parser().parse_args(["serve", *engine_flags])

    # The server builds and steps its engine on one background thread; so does this measurement
    # (one thread for all torch work keeps a CPU's OpenMP workers spin-waiting: AsyncEngine).
    thread = concurrent.futures.ThreadPoolExecutor(1)
    engine = thread.submit(build_engine, engine_config_from_args(serve_args)).result()
    server = ServerProcess(*engine_flags)
    server.start()
    url = server.url("/v1/completions")
    try:
        thread.submit(engine_step_times, engine, 8).result()  # warm-up, both sides
        client_itls(url, 8)
        steps, itls, in_server = [], [], []
        for _ in range(args.rounds):
            steps += thread.submit(engine_step_times, engine, args.tokens).result()
            seconds_before, steps_before = server_step_time(server)
            itls += client_itls(url, args.tokens)
            seconds_after, steps_after = server_step_time(server)
            in_server.append((seconds_after - seconds_before) / (steps_after - steps_before))
    finally:
        server.stop()
    flags = " ".join(engine_flags)
    print(f"concurrency 1, {args.tokens} tokens x {args.rounds} rounds, engine flags: {flags}")
    print(summary("engine decode step", steps))
    print(summary("step in the server (means)", in_server))
    print(summary("streaming client ITL", itls))
    ratio = statistics.median(itls) / statistics.median(steps)
    verdict = "OK" if ratio <= 1.15 else "OVER the 1.15 budget"
    print(f"ratio (median client ITL / median engine step): {ratio:.3f}  {verdict}")
    return 0 if ratio <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
