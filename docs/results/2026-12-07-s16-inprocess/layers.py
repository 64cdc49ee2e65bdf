"""30 fused layers (all weights streamed) at T rows of one request, context L."""
import time, torch, statistics, sys
from tokenmill import LLM
llm = LLM(quantization="gguf", max_num_seqs=8, kv_cache_memory_gib=1)
runner = llm.engine.runner; fd = runner.fused_decode; K = fd.kernels; arch = fd.arch
H, Hkv, D, E = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim, arch.hidden_size
BS = 16
def bench(f, n=60):
    for _ in range(5): f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return statistics.median(ts)*1e3
for L in (200, 500, 900):
    nb = (L+16)//BS+1
    caches = [torch.randn(2, nb, BS, Hkv, D, dtype=torch.bfloat16)*0.3 for _ in fd._layers]
    res = {}
    for T in (1, 4, 5, 7, 9):
        x0 = torch.randn(T, E, dtype=torch.bfloat16)
        pos = torch.arange(L-T, L)
        cos = torch.randn(T, D); sin = torch.randn(T, D)
        slots = pos.clone()
        bt = torch.arange(nb, dtype=torch.int64).repeat(T, 1)
        sl = pos + 1
        def step():
            x = x0.clone()
            for i,(n1,n2,w,lay,sc) in enumerate(fd._layers):
                K.llama_decode_layer(x, n1, n2, arch.rms_norm_eps, w, lay, cos, sin, caches[i], slots, bt, sl, H, Hkv, sc, None)
        res[T] = bench(step)
    print(f"L={L}: " + "  ".join(f"T={T} {ms:.2f} ms ({ms/res[1]:.2f}x)" for T, ms in res.items()), flush=True)
rows = torch.randn(1, E, dtype=torch.bfloat16)
print("lm_head 1", bench(lambda: runner.model.compute_logits(rows)))
