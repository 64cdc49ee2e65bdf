"""Decode speed under each OpenMP wait policy, alone on the machine and beside a busy process.

    python scripts/bench_omp_wait.py [--rounds 2] [--tokens 64] [--batch-sizes 1,32]

libgomp's threads spin at the end of every parallel region (OMP_WAIT_POLICY unset: up to
GOMP_SPINCOUNT=300000 spins) so that the next region starts without a wake-up. With as many
threads as cores that saves a futex wake per region; with one more busy process on the machine,
the spinning thread burns the time slice its descheduled sibling needs, and every region of a
step waits for a slice. Each configuration runs in a fresh process (libgomp reads the variables
once), alternating round by round so drifting bandwidth hits all alike:

    default   OMP_WAIT_POLICY unset
    passive   OMP_WAIT_POLICY=PASSIVE (threads sleep at once)
    spin10k   GOMP_SPINCOUNT=10000 (spin ~10 us, then sleep)

"beside a busy process": one pure-Python spinning process runs for the whole measurement, as a
second tenant, a tokenizer, or a client on the same machine would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CONFIGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
}

CHILD = r"""
import json, sys, time
from tokenmill import LLM, SamplingParams
batch_sizes, tokens = json.loads(sys.argv[1]), int(sys.argv[2])
llm = LLM(quantization="gguf", kv_cache_memory_gib=0.5)
params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
out = {}
for batch in batch_sizes:
    prompts = [f"Write a story about lighthouse number {i}." for i in range(batch)]
    llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    out[batch] = batch * tokens / (time.perf_counter() - start)
print(json.dumps(out))
"""


def run_once(env_extra: dict, batch_sizes: list[int], tokens: int) -> dict[int, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    args = [sys.executable, "-c", CHILD, json.dumps(batch_sizes), str(tokens)]
    result = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}


def measure(rounds: int, batch_sizes: list[int], tokens: int, busy: bool) -> dict:
    spinner = None
    if busy:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        runs = {name: [] for name in CONFIGS}
        for _ in range(rounds):
            for name, env_extra in CONFIGS.items():
                runs[name].append(run_once(env_extra, batch_sizes, tokens))
    finally:
        if spinner is not None:
            spinner.kill()
    return {
        name: {b: statistics.median(r[b] for r in rs) for b in batch_sizes}
        for name, rs in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"load before: {os.getloadavg()}")
    table = {}
    for busy in (False, True):
        label = "beside a busy process" if busy else "alone"
        table[label] = measure(args.rounds, batch_sizes, args.tokens, busy)
        print(f"\n{label}: decode tokens/s (median of {args.rounds}), ratio to default")
        for name, by_batch in table[label].items():
            cells = [
                f"batch {b}: {v:7.1f} ({v / table[label]['default'][b]:.2f}x)"
                for b, v in by_batch.items()
            ]
            print(f"  {name:8s} " + "   ".join(cells))
    print(f"load after: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
