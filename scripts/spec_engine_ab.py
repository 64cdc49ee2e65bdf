"""`auto` speculation against none in one process: the engine alone, no HTTP, no client.

    python scripts/spec_engine_ab.py [--concurrency 32] [--repeats 4] [--method ngram] [--cold]

Two engines over the GGUF's Q4_1 blocks (spec_bench's tm-q4 settings, `--max-num-seqs` = the
concurrency, so the rest queue as a closed loop's would), the same ShareGPT requests as
spec_bench's part at that concurrency (chat template, greedy, replies capped at 96), timed in
alternating order. By default a first pass over every prompt warms both prefix caches, so the
timed passes are decode-dominated: where drafting's cost and gain show most plainly (through
the server, fresh processes spend ~70% of a run on prompts and pairs scatter ~5%). `--cold`
times the first passes too. Prints output tokens/s per pass, the means, and auto / none per
pair.
"""

from __future__ import annotations

import argparse
import statistics
import time

from tokenmill import LLM, SamplingParams
from tokenmill.bench.spec_bench import sharegpt_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--method", default="ngram", choices=("ngram", "self"))
    parser.add_argument("--cold", action="store_true", help="time the first (uncached) passes")
    args = parser.parse_args()

    base = {"max_num_seqs": args.concurrency, "kv_cache_memory_gib": 2}
    base["quantization"] = "gguf" if args.method == "ngram" else "none"
    spec = {"method": args.method, "num_speculative_tokens": "auto"}
    engines = {"none": LLM(**base), "auto": LLM(**base, speculative_config=spec)}
    tokenizer = engines["none"].get_tokenizer()
    workload = sharegpt_workload(args.concurrency, 96, tokenizer, 0, 32)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r.prompt}], add_generation_prompt=True
        )
        for r in workload.requests
    ]
    params = [SamplingParams(max_tokens=r.output_len, temperature=0) for r in workload.requests]
    print(f"{len(prompts)} requests, {sum(map(len, prompts))} prompt tokens", flush=True)
    warm = 2 if args.cold else len(prompts)  # --cold: two requests, to load and build only
    for llm in engines.values():
        llm.generate(prompts[:warm], params[:warm], use_tqdm=False)

    rates: dict[str, list[float]] = {"none": [], "auto": []}
    for rep in range(args.repeats):
        order = ["none", "auto"] if rep % 2 == 0 else ["auto", "none"]
        for name in order:
            start = time.perf_counter()
            outputs = engines[name].generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            rates[name].append(tokens / seconds)
            print(f"{name}: {tokens / seconds:.1f} tok/s ({tokens} tokens, {seconds:.2f} s)")
    none, auto = (statistics.mean(rates[k]) for k in ("none", "auto"))
    pairs = [a / n for a, n in zip(rates["auto"], rates["none"], strict=True)]
    print(f"mean none {none:.1f}, auto {auto:.1f} tok/s: auto / none {auto / none:.3f}")
    print("auto / none per pair: " + ", ".join(f"{p:.3f}" for p in pairs))
    counters = engines["auto"].engine.spec.counters
    print(
        f"drafts {counters.num_draft_tokens}, accepted {counters.num_accepted_tokens} "
        f"({counters.num_accepted_tokens / max(counters.num_draft_tokens, 1):.2f})"
    )


if __name__ == "__main__":
    main()
