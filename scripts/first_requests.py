"""How soon a fresh `tokenmill serve` answers, and whether its first request is as fast as later
ones (nothing left to compile, pack or warm up on a user's first request).

    python scripts/first_requests.py [--requests 10] [--max-tokens 32] [serve flags]

Prints the seconds from process start to a healthy /health, then each request's end-to-end
latency and streaming time to first token, for the same greedy chat request sent one at a time.
The server runs with --no-prefix-caching, so that every request computes its whole prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import httpx

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from tests.server_fixtures import MODEL_NAME, ServerProcess  # noqa: E402


def timed_request(url: str, max_tokens: int) -> tuple[float, float]:
    """(time to first token, end-to-end) of one streamed greedy chat request, in seconds."""
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Tell me about lighthouses."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    first = None
    with httpx.stream("POST", url, json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            is_event = first is None and line.startswith("data: {")
            if is_event and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return first or float("nan"), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    args, serve_flags = parser.parse_known_args()
    server = ServerProcess(*serve_flags, "--no-prefix-caching")
    start = time.perf_counter()
    server.start()
    ready = time.perf_counter() - start
    try:
        url = server.url("/v1/chat/completions")
        results = [timed_request(url, args.max_tokens) for _ in range(args.requests)]
    finally:
        server.stop()
    print(f"serve flags: {' '.join(serve_flags) or '(defaults)'}")
    print(f"process start -> /health 200: {ready:.1f} s")
    for i, (ttft, e2e) in enumerate(results, start=1):
        print(f"request {i:2d}: TTFT {ttft * 1000:7.1f} ms, end to end {e2e * 1000:7.1f} ms")
    later = statistics.median(e2e for _, e2e in results[1:])
    print(f"first / median of the rest (end to end): {results[0][1] / later:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
