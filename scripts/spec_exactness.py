"""Greedy output with speculation equals greedy output without it, token for token.

    python scripts/spec_exactness.py [--prompts 64] [--max-tokens 32] [--dtype float32]

For every method (ngram, self, and draft with the target itself as the draft model), every k in
{1, 2, 4, 8, auto}, at concurrency 1 and 64: how many of the ShareGPT prompts match the output
without speculation exactly, and the acceptance rate. A draft equal to the target must accept
every draft. Where an output differs, the first differing position and the reference's top-2
logprob gap there are printed (a near-tie is rounding, a wide gap a bug).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from tokenmill import LLM
from tokenmill.engine.build import engine_sharing_weights
from tokenmill.loader.default_model import default_model_path
from tokenmill.sampling_params import SamplingParams
from tokenmill.workload.sharegpt import load_pairs


def engine_with(base: LLM, spec, max_num_seqs: int) -> LLM:
    cfg = base.engine.config
    cfg = dataclasses.replace(
        cfg,
        speculative_config=spec,
        scheduler=dataclasses.replace(cfg.scheduler, max_num_seqs=max_num_seqs),
    )
    return LLM.from_engine(engine_sharing_weights(base.engine, cfg))


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_gap(base: LLM, prompt: list[int], output: list[int], position: int) -> float:
    """The reference's logprob gap between its top two tokens at `position` of the output."""
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=2)
    out = base.generate([prompt + output[:position]], params)[0].outputs[0]
    top = sorted((lp.logprob for lp in out.logprobs[0].values()), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", default="ngram,self,draft")
    parser.add_argument("--ks", default="1,2,4,8,auto")
    parser.add_argument("--concurrencies", default="1,64")
    args = parser.parse_args()
    base = LLM(dtype=args.dtype, kv_cache_memory_gib=1.0)
    tok = base.get_tokenizer()
    pairs = [first for first, _ in load_pairs()[:400] if first.strip()][: args.prompts]
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p[:2000]}], add_generation_prompt=True)
        for p in pairs
    ]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    ref = [o.outputs[0].token_ids for o in engine_with(base, None, 64).generate(prompts, params)]
    rows = []
    for method in args.methods.split(","):
        for k in args.ks.split(","):
            spec = {"method": method, "num_speculative_tokens": k if k == "auto" else int(k)}
            if method == "draft":
                spec |= {"model": default_model_path(), "quantization": "none"}
            for conc in map(int, args.concurrencies.split(",")):
                llm = engine_with(base, spec, conc)
                start = time.perf_counter()
                got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
                wall = time.perf_counter() - start
                counters = llm.engine.stats().spec
                diffs = [
                    (i, first_difference(r, g))
                    for i, (r, g) in enumerate(zip(ref, got, strict=True))
                ]
                diffs = [(i, d) for i, d in diffs if d is not None]
                gaps = [top2_gap(base, prompts[i], ref[i], d) for i, d in diffs[:3]]
                row = {
                    "method": method, "k": k, "concurrency": conc,
                    "equal": len(prompts) - len(diffs), "prompts": len(prompts),
                    "acceptance": round(counters.acceptance_rate, 3),
                    "draft_tokens": counters.num_draft_tokens, "wall_s": round(wall, 1),
                    "first_diffs": diffs[:3], "top2_gaps": [round(g, 4) for g in gaps],
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| method | k | concurrency | equal | acceptance | draft tokens |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['k']} | {r['concurrency']} | {r['equal']}/{r['prompts']} "
            f"| {r['acceptance']:.2f} | {r['draft_tokens']} |"
        )


if __name__ == "__main__":
    main()
