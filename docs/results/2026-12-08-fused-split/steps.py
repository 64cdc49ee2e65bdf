"""Step time by kind: N decodes alone (fused / eager) and N decodes + p prompt tokens."""
import sys, time, statistics, random
import torch
from tokenmill import LLM, SamplingParams
N = int(sys.argv[1]) if len(sys.argv) > 1 else 24
llm = LLM(quantization="gguf", max_num_seqs=64, kv_cache_memory_gib=2, max_num_batched_tokens=512,
          enable_prefix_caching=False)
eng = llm.engine
runner = eng.runner
log = []
orig = runner.execute
def execute(so):
    t = time.perf_counter(); out = orig(so); dt = time.perf_counter() - t
    log.append((so.num_prefill_tokens, so.num_decode_tokens, dt))
    return out
runner.execute = execute
eng._runner_execute = execute
rng = random.Random(0)
vocab = 40000
def prompt(n): return [rng.randrange(100, vocab) for _ in range(n)]
p = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
for i in range(N):
    eng.add_request(f"d{i}", prompt(300), p)
while True:
    eng.step()
    if log and log[-1][0] == 0 and log[-1][1] == N: break
def run_steps(k):
    log.clear()
    for _ in range(k): eng.step()
    return statistics.median(d for _, _, d in log) * 1e3
fd = runner.fused_decode
print(f"N={N} decode-only fused: {run_steps(30):.1f} ms")
can = fd.can_run; fd.can_run = lambda inputs: False
print(f"N={N} decode-only eager: {run_steps(30):.1f} ms")
fd.can_run = can
print(f"N={N} decode-only fused: {run_steps(30):.1f} ms")
for ptoks in (1, 4, 16, 64, 128, 256):
    ts = []
    for r in range(5):
        rid = f"p{ptoks}-{r}"
        eng.add_request(rid, prompt(ptoks + 1), SamplingParams(max_tokens=1, temperature=0))
        log.clear(); eng.step()
        ts += [d for pf, dc, d in log if pf]
        eng.abort_request(rid); eng.step()
    print(f"N={N} + prompt {ptoks}: {statistics.median(ts)*1e3:.1f} ms")
