"""Prompt-only step time (one 512-token prompt, no decodes), GGUF and bf16 weights."""
import sys, time, statistics, random
from tokenmill import LLM, SamplingParams
rng = random.Random(0)
for q in ("gguf", "none"):
    llm = LLM(quantization=q, max_num_seqs=8, kv_cache_memory_gib=1, enable_prefix_caching=False)
    ts = []
    for r in range(14):
        p = [rng.randrange(100, 40000) for _ in range(512)]
        t = time.perf_counter(); llm.generate([p], SamplingParams(max_tokens=1), use_tqdm=False); ts.append(time.perf_counter() - t)
    print(f"{q or 'bf16'}: 512-token prompt alone, median {statistics.median(ts[2:])*1e3:.1f} ms", flush=True)
    del llm
