"""One prepared run of everything GPU-related: kernel correctness, engine parity between
attention backends, and timings next to the card's ceilings measured in the same run.

    PYTHONPATH=. python scripts/gpu_check.py --out results.json

Needs a CUDA GPU, torch and triton; the model weights are random (dummy) in the shapes of real
models, since no model file travels to the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SMOLLM2 = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
)  # fmt: skip
LLAMA_1B = dict(
    model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
    max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)  # fmt: skip


def log(*args) -> None:
    print(*args, flush=True)


def cuda_time(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def ceilings() -> dict:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * n**3 / cuda_time(lambda: a @ b, 10)
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / cuda_time(lambda: dst.copy_(src), 10)
    return {"bf16_matmul_tflops": flops / 1e12, "copy_gb_s": bw / 1e9}


def kernel_correctness() -> dict:
    from tests.test_attention_backends import CASES, run_case
    from tokenmill.attention.backends.torch_backend import TorchAttentionBackend
    from tokenmill.attention.backends.triton_backend import TritonAttentionBackend

    result = {}
    for name, backend in (("triton", TritonAttentionBackend()), ("torch", TorchAttentionBackend())):
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            worst = 0.0
            for case in CASES:
                got, expected = run_case(backend, case, dtype=dtype, device="cuda")
                worst = max(worst, float((got - expected).abs().max()))
            key = f"{name}_{str(dtype).split('.')[-1]}"
            result[key] = {"max_abs_err": worst, "ok": worst < tol}
            log(f"kernel {key}: max abs err {worst:.2e} ({'ok' if worst < tol else 'FAIL'})")
    return result


def attention_bench() -> dict:
    import tests.test_attention_backends as tab
    from tests.test_attention_backends import make_step
    from tokenmill.attention.backends.base import AttentionSpec
    from tokenmill.attention.backends.torch_backend import TorchAttentionBackend
    from tokenmill.attention.backends.triton_backend import TritonAttentionBackend

    results = {}
    heads, kv_heads, dim = 32, 8, 128
    spec = AttentionSpec(0, heads, kv_heads, dim, dim**-0.5)
    shapes = {
        "decode 64 x ctx 2048": [(2047, 1)] * 64,
        "decode 64 x ctx 8192": [(8191, 1)] * 64,
        "prefill 1 x 4096": [(0, 4096)],
        "chunk 512 after 4096": [(4096, 512)],
    }
    for label, requests in shapes.items():
        total_blocks = sum(-(-(c + n) // 16) for c, n in requests)
        tab.NUM_BLOCKS = total_blocks + 8
        md = make_step(requests, torch.Generator().manual_seed(0), "cuda")
        tokens = md.num_tokens
        q = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cache = torch.randn(
            2, tab.NUM_BLOCKS, 16, kv_heads, dim, device="cuda", dtype=torch.bfloat16
        )
        kv_bytes = sum(c + n for c, n in requests) * 2 * kv_heads * dim * 2
        pairs = sum(n * c + n * (n + 1) // 2 for c, n in requests)
        flops = 4 * pairs * heads * dim
        row = {}
        for name, backend in (
            ("triton", TritonAttentionBackend()),
            ("torch", TorchAttentionBackend()),
        ):
            args = (spec, q, k, v, cache, md)
            t = cuda_time(lambda b=backend, a=args: b.forward(*a))
            row[name] = {"ms": t * 1e3, "kv_gb_s": kv_bytes / t / 1e9, "tflops": flops / t / 1e12}
        row["speedup_triton_vs_torch"] = row["torch"]["ms"] / row["triton"]["ms"]
        results[label] = row
        log(f"attention {label}: {json.dumps(row)}")
    return results


def engine_parity() -> dict:
    """fp32 SmolLM2-shaped engine: torch backend vs Triton backend vs Triton + decode graphs."""
    from tokenmill import LLM, SamplingParams

    prompts = [[(31 * i + 7 * j) % 40000 + 100 for j in range(20 + 37 * i)] for i in range(8)]
    params = [
        SamplingParams(max_tokens=8 + 4 * i, temperature=0, prompt_logprobs=1, logprobs=1,
                       ignore_eos=True)
        for i in range(8)
    ]  # fmt: skip
    outs = {}
    for backend, graphs in (("torch", "off"), ("triton", "off"), ("triton", "auto")):
        llm = LLM(
            load_format="dummy", dummy_config=SMOLLM2, device="cuda", dtype="float32",
            attention_backend=backend, kv_cache_memory_gib=1.0, max_num_batched_tokens=64,
            decode_graphs=graphs, max_num_seqs=16,
        )  # fmt: skip
        outs[f"{backend}/{graphs}"] = llm.generate(prompts, params, use_tqdm=False)
        del llm
        torch.cuda.empty_cache()
    result = {}
    ref = outs["torch/off"]
    for key in ("triton/off", "triton/auto"):
        worst, same = 0.0, 0
        for a, b in zip(ref, outs[key], strict=True):
            same += a.outputs[0].token_ids == b.outputs[0].token_ids
            pairs = list(zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True))
            pairs += list(zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True))
            for pa, pb in pairs:
                for tok, lp in pa.items():
                    if tok in pb:
                        worst = max(worst, abs(lp.logprob - pb[tok].logprob))
        result[key] = {"greedy_equal": same, "of": 8, "max_dlogprob": worst}
        log(f"engine parity fp32 torch vs {key}: {same}/8 greedy equal, max dlogprob {worst:.2e}")
    return result


def engine_throughput(
    config: dict, name: str, graphs: str, batches=(1, 32, 128), out_len=128
) -> dict:
    from tokenmill import LLM, SamplingParams

    llm = LLM(
        load_format="dummy", dummy_config=config, device="cuda", dtype="bfloat16",
        attention_backend="triton", kv_cache_memory_gib=8.0, max_num_seqs=max(batches),
        max_num_batched_tokens=8192, record_step_trace=True, decode_graphs=graphs,
    )  # fmt: skip
    params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    results = {}
    for batch in batches:
        prompts = [[(97 * i + j) % 30000 + 50 for j in range(128)] for i in range(batch)]
        llm.engine.step_trace.clear()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        decode = [s.wall_time_s for s in llm.engine.step_trace if not s.has_prompt_tokens]
        step = statistics.median(decode)
        results[batch] = {
            "decode_step_ms": step * 1e3, "decode_tok_s": batch / step,
            "end_to_end_output_tok_s": batch * out_len / wall,
        }  # fmt: skip
        log(f"engine {name} bf16 graphs={graphs} batch {batch}: {json.dumps(results[batch])}")
    del llm
    torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    import triton

    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    log(report)
    for key, fn in (
        ("ceilings", ceilings),
        ("kernel_correctness", kernel_correctness),
        ("attention_bench", attention_bench),
        ("engine_parity", engine_parity),
        ("smollm2_eager", lambda: engine_throughput(SMOLLM2, "SmolLM2-135M", "off")),
        ("smollm2_graphs", lambda: engine_throughput(SMOLLM2, "SmolLM2-135M", "auto")),
        ("llama_1b_eager", lambda: engine_throughput(LLAMA_1B, "Llama-3.2-1B", "off")),
        ("llama_1b_graphs", lambda: engine_throughput(LLAMA_1B, "Llama-3.2-1B", "auto")),
    ):
        start = time.perf_counter()
        try:
            report[key] = fn()
        except Exception as exc:  # noqa: BLE001 - report every section, whatever fails
            report[key] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{key} FAILED: {exc!r}")
        log(f"-- {key} took {time.perf_counter() - start:.1f}s")
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
