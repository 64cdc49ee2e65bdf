import time, torch, statistics
from tokenmill.native import kernels
K = kernels()
H, Hkv, D, BS = 9, 3, 64, 16
def bench(f, n=300):
    for _ in range(20): f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return statistics.median(ts)*1e6
for L in (200, 500, 900):
    nb = (L+16)//BS+1
    kc = torch.randn(nb, BS, Hkv, D, dtype=torch.bfloat16); vc = torch.randn(nb, BS, Hkv, D, dtype=torch.bfloat16)
    out = []
    for T in (1,2,3,4,5,6,7,8,9):
        q = torch.randn(T, H, D, dtype=torch.bfloat16)
        bt = torch.arange(nb, dtype=torch.int64).repeat(T,1)
        sl = torch.arange(L-T+1, L+1, dtype=torch.int64)
        out.append(f"T={T} {bench(lambda: K.paged_decode_attention(q, kc, vc, bt, sl, D**-0.5, 0)):.0f}")
    print(f"L={L} us:", " ".join(out))
