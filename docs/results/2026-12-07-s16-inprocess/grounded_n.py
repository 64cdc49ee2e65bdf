import sys, collections, statistics
from tokenmill import LLM, SamplingParams
from tokenmill.bench.spec_bench import grounded_workload
from tokenmill.spec import decoder as dec, ngram
last_n = {}
orig_c = ngram.SuffixIndex.continuation
def continuation(self, tokens, k):
    size = len(tokens); out = orig_c(self, tokens, k)
    self.last_n = 0
    for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
        if self._ends.get(tuple(tokens[size - n:])) is not None:
            self.last_n = n; break
    return out
ngram.SuffixIndex.continuation = continuation
log = []; stood = {}
orig = dec.SpecDecoder.observe
def observe(self, sched_out, runner_out, wall_s):
    for s in sched_out.scheduled:
        k = len(s.spec_token_ids); t = runner_out.sampled.get(s.req_id)
        if t is not None and k:
            a = dec._accepted(s.spec_token_ids, t)
            idx = self.proposer._indexes.get(s.req_id)
            log.append((idx.last_n if idx else -1, stood.get(s.req_id), k, a))
            stood[s.req_id] = a == k
    return orig(self, sched_out, runner_out, wall_s)
dec.SpecDecoder.observe = observe
spec = {"method": "ngram", "num_speculative_tokens": int(sys.argv[1])}
wl = grounded_workload(6, 320)
llm = LLM(quantization="gguf", max_num_seqs=1, kv_cache_memory_gib=1, speculative_config=spec)
tok = llm.get_tokenizer()
prompts = [tok.apply_chat_template([{"role": "user", "content": r.prompt}], add_generation_prompt=True) for r in wl.requests]
for p in prompts: llm.generate([p], SamplingParams(max_tokens=320, temperature=0), use_tqdm=False)
g = collections.defaultdict(list)
for n, st, k, a in log:
    g[(n, st)].append(a / k)
    g[(n, 'any')].append(a / k)
for key in sorted(g, key=str): print(key, len(g[key]), f"{statistics.mean(g[key]):.2f}", f"first-pos {statistics.mean(1.0 if x>0 else 0.0 for x in g[key]):.2f}")
