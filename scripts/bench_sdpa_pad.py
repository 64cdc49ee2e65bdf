"""Prefill throughput with SDPA's inputs padded to a multiple of 64 (the default) against
unpadded, alternating in one process: `python scripts/bench_sdpa_pad.py` (BENCHMARKS.md
section 13). 96 ShareGPT prompts, max_tokens 1, `--quantization gguf`, the prefix cache
emptied before each pass so every prompt is prefilled in full."""

from __future__ import annotations

import time

from tokenmill.attention.backends import torch_backend
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams
from tokenmill.workload.sharegpt import sample_sharegpt


def main() -> None:
    llm = LLM(quantization="gguf")
    reqs = sample_sharegpt(llm.get_tokenizer(), 96, max_prompt_len=1024)
    prompts = [r.prompt for r in reqs]
    tokens = sum(r.prompt_len for r in reqs)
    params = SamplingParams(max_tokens=1, temperature=0)
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
    for rep in range(3):
        for pad in (64, 1):
            torch_backend.SDPA_PAD = pad
            llm.engine.reset_prefix_cache()
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            took = time.perf_counter() - start
            print(f"rep {rep} SDPA_PAD={pad:2d}: {tokens} prompt tokens in {took:.2f} s "
                  f"= {tokens / took:.0f} tok/s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
