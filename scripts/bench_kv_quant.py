"""Decode at batch 64 with 2k-token contexts: bf16 KV cache vs int8 (and fp8) KV cache, one run.

    python scripts/bench_kv_quant.py [--batch 64] [--context 2048] [--steps 6] [--rounds 2]
                                     [--quantization none|gguf|...]
                                     [--kv-dtypes bfloat16,int8,bfloat16:eager,int8:eager] [MODEL]

The model (default: the bundled SmolLM2-135M in bf16) is loaded once; each KV dtype gets its own
runner over the same weights (ModelRunner.sharing_weights) whose cache holds every request's
context. The contexts are written straight into the cache (random K/V of unit scale, quantized
for int8/fp8) instead of prefilled: a 2k prefill of 64 requests would take minutes on a CPU and
the decode step's cost does not depend on what the cache holds. Each round times `--steps`
decode steps per dtype, alternating dtypes round by round so background load hits all alike;
the best step time per dtype is reported, with its ratio to the first dtype.

Every runner takes the fused native decode layer where the CPU has it (as the engine does),
over whichever cache it has. A dtype written `bfloat16:eager` (or `int8:eager`) runs the eager
layers with the native decode kernels instead: bf16 against int8 there shows the attention
kernels' gain alone. Ratios are against the first dtype listed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from tokenmill import LLM  # noqa: E402
from tokenmill.attention import kv_quant  # noqa: E402
from tokenmill.engine.interfaces import NewRequestData, ScheduledRequest, SchedulerOutput  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", default="none", help="the weights' scheme (e.g. gguf)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kv-dtypes", default="bfloat16,int8,bfloat16:eager,int8:eager")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args()


def runner_for(base: LLM, kv_dtype: str, num_blocks: int, fused: bool):
    cfg = base.engine.config
    cache = dataclasses.replace(cfg.cache, kv_cache_dtype=kv_dtype, num_blocks=num_blocks)
    cfg = dataclasses.replace(cfg, cache=cache, cpu_fused_decode=fused)
    runner = base.engine.runner.sharing_weights(cfg)
    fill_cache(runner)
    return runner


def fill_cache(runner) -> None:
    """Random K/V of unit scale in every slot: one layer's worth, copied to all layers."""
    layer = runner.kv_cache[0]  # [2, NB, BS, Hkv, D]
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(layer.shape, generator=gen, dtype=torch.float32)
    if runner.kv_scales is None:
        layer.copy_(values)
        for i in range(1, runner.kv_cache.shape[0]):
            runner.kv_cache[i].copy_(layer)
        return
    rows = values.view(2, -1, *values.shape[-2:])  # (2, slots, Hkv, D)
    slots = torch.arange(rows.shape[1])
    kv_quant.write_kv_quantized(layer, runner.kv_scales[0], rows[0], rows[1], slots)
    for i in range(1, runner.kv_cache.shape[0]):
        runner.kv_cache[i].view(torch.int8).copy_(layer.view(torch.int8))
        runner.kv_scales[i].copy_(runner.kv_scales[0])


class DecodeSteps:
    """Drives one runner through decode steps of `batch` requests with `context` cached tokens."""

    def __init__(self, runner, batch: int, context: int, max_steps: int) -> None:
        self.runner, self.batch = runner, batch
        blocks_per_req = -(-(context + max_steps + 1) // runner.block_size)
        self.tables = [
            list(range(b * blocks_per_req, (b + 1) * blocks_per_req)) for b in range(batch)
        ]
        self.computed = [context] * batch
        self.last = [1] * batch
        params = SamplingParams(max_tokens=max_steps + 1, temperature=0, ignore_eos=True)
        self.first = SchedulerOutput(
            [ScheduledRequest(f"r{b}", [1], context, self.tables[b], True) for b in range(batch)],
            [NewRequestData(f"r{b}", [1] * (context + 1), params) for b in range(batch)],
            [],
        )

    def step(self) -> float:
        if self.first is not None:
            sched, self.first = self.first, None
        else:
            sched = SchedulerOutput(
                [
                    ScheduledRequest(f"r{b}", [self.last[b]], self.computed[b], [], True,
                                     len(self.tables[b]))
                    for b in range(self.batch)
                ],
                [], [],
            )  # fmt: skip
        start = time.perf_counter()
        out = self.runner.execute(sched)
        elapsed = time.perf_counter() - start
        for b in range(self.batch):
            self.last[b] = out.sampled[f"r{b}"][0]
            self.computed[b] += 1
        return elapsed


def main() -> int:
    args = parse_args()
    kv_dtypes = args.kv_dtypes.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = LLM(
        args.model, dtype=args.dtype, quantization=args.quantization, kv_cache_memory_gib=0.05
    )
    print(
        f"model {base.engine.loaded.source}, dtype {args.dtype}, weights "
        f"{base.engine.runner.quantization}, threads {torch.get_num_threads()}"
    )
    total_steps = args.rounds * args.steps
    blocks = args.batch * -(
        -(args.context + total_steps + 2) // base.engine.config.cache.block_size
    )
    drivers = {}
    for kv in kv_dtypes:
        name, _, mode = kv.partition(":")
        runner = runner_for(base, name, blocks, fused=mode != "eager")
        drivers[kv] = DecodeSteps(runner, args.batch, args.context, total_steps + 1)
        drivers[kv].step()  # the first step: requests arrive, their tables are set
        fused = runner.fused_decode is not None
        print(f"{kv}: {runner.num_blocks} blocks, fused decode layer: {fused}")
    best = {kv: float("inf") for kv in kv_dtypes}
    for r in range(args.rounds):
        for kv, driver in drivers.items():
            times = [driver.step() for _ in range(args.steps)]
            best[kv] = min(best[kv], *times)
            print(f"round {r}: {kv:14s} " + " ".join(f"{t * 1e3:.0f}" for t in times) + " ms")
    ref = kv_dtypes[0]
    for kv in kv_dtypes:
        tok_s = args.batch / best[kv]
        print(
            f"{kv:14s} best step {best[kv] * 1e3:7.1f} ms  {tok_s:7.0f} tok/s  "
            f"speed vs {ref}: {best[ref] / best[kv]:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
