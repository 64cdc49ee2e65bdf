import time, torch, statistics
from tokenmill import LLM
llm = LLM(quantization="gguf", max_num_seqs=8, kv_cache_memory_gib=1)
fd = llm.engine.runner.fused_decode; K = fd.kernels
def bench(f, n=60):
    for _ in range(5): f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return statistics.median(ts)*1e3
res=[]
for M in (1,2,3,4,5,6,7,8,9):
    xs = {k: torch.randn(M, k, dtype=torch.bfloat16) for k in (576, 1536)}
    def allg():
        for (n1,n2,ws,lay,sc) in fd._layers:
            for i,w in enumerate(ws):
                bits, has_min, group, out_f, act = lay[5*i:5*i+5]
                K.quant_gemm(xs[w.shape[1]*group], w, bits, bool(has_min), group, out_f, act)
    res.append(f"M={M} {bench(allg):.2f}")
print("30 layers' GEMMs, cold weights, ms:", " ".join(res))
