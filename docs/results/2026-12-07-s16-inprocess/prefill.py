import time
from tokenmill import LLM, SamplingParams
from tokenmill.bench.spec_bench import grounded_workload
wl = grounded_workload(6, 320)
llm = LLM(quantization="gguf", max_num_seqs=1, kv_cache_memory_gib=1, enable_prefix_caching=False)
tok = llm.get_tokenizer()
prompts = [tok.apply_chat_template([{"role": "user", "content": r.prompt}], add_generation_prompt=True) for r in wl.requests]
llm.generate(prompts[:1], SamplingParams(max_tokens=1), use_tqdm=False)
t = time.perf_counter()
for p in prompts: llm.generate([p], SamplingParams(max_tokens=1), use_tqdm=False)
s = time.perf_counter() - t
n = sum(len(p) for p in prompts)
print(f"prefill {n} tokens in {s:.2f} s: {n/s:.0f} tok/s")
