"""Batch-1 grounded in-process: none vs auto, with per-verify (k, accepted) and step times."""
import sys, time, collections, statistics
from tokenmill import LLM, SamplingParams
from tokenmill.bench.spec_bench import grounded_workload
from tokenmill.spec import decoder as dec
n = int(sys.argv[1]) if len(sys.argv) > 1 else 6
which = sys.argv[2].split(",") if len(sys.argv) > 2 else ["none", "auto"]
import os, json
spec = {"method": "ngram", "num_speculative_tokens": "auto", **json.loads(os.environ.get("SPEC", "{}"))}
wl = grounded_workload(n, 320)
log = []
orig = dec.SpecDecoder.observe
def observe(self, sched_out, runner_out, wall_s):
    for s in sched_out.scheduled:
        k = len(s.spec_token_ids); t = runner_out.sampled.get(s.req_id)
        if t is not None:
            log.append((k, dec._accepted(s.spec_token_ids, t) if k else 0, wall_s, s.num_computed_tokens))
    return orig(self, sched_out, runner_out, wall_s)
dec.SpecDecoder.observe = observe
for name in which:
    llm = LLM(quantization="gguf", max_num_seqs=1, kv_cache_memory_gib=1, enable_prefix_caching=True,
              **({"speculative_config": spec} if name == "auto" else {}))
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": r.prompt}], add_generation_prompt=True) for r in wl.requests]
    params = SamplingParams(max_tokens=320, temperature=0)
    llm.generate(prompts, params, use_tqdm=False)  # warm prefix cache
    for rep in range(2):
        log.clear()
        t = time.perf_counter(); outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]; s = time.perf_counter() - t
        toks = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"{name}: {toks/s:.1f} tok/s ({toks} tokens {s:.2f}s)", flush=True)
    if name == "auto":
        byk = collections.defaultdict(list)
        for k, a, w, c in log: byk[k].append((a, w))
        for k in sorted(byk):
            v = byk[k]
            print(f"  k={k}: steps {len(v)}, mean accepted {statistics.mean(a for a,_ in v):.2f}, median step {statistics.median(w for _,w in v)*1e3:.2f} ms")
        seq = "".join(str(min(a,9)) if k else "." for k, a, w, c in log)
        print(seq[:600])
        # transitions: accepted-all previous vs not
        full = collections.defaultdict(list)
        prev = None
        for k, a, w, c in log:
            if k and prev is not None: full[prev].append(a / k)
            if k: prev = (a == k)
        for p, v in full.items(): print(f"  after {'full' if p else 'partial'}: n {len(v)}, mean frac accepted {statistics.mean(v):.2f}")
    del llm
