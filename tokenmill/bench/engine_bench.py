"""The engine's own speed next to this machine's ceilings, measured in one run.

For each dtype (and weight quantization): prefill tokens/s (one 512-token prompt; 64 prompts of 128), decode tokens/s at
batch 1 and 64 (median step time of pure-decode steps), each with the model's FLOPs and bytes per
step from tokenmill.perf and the fraction of the roofline reached; then the continuous-batching
gain: 64 requests at once vs the same requests one at a time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

from tokenmill.bench.ceilings import Ceilings, measure
from tokenmill.perf import Precision, step_cost


@dataclass
class Phase:
    name: str
    dtype: str
    batch: int
    tokens_per_s: float
    step_time_s: float
    gflop_per_step: float
    gbytes_per_step: float
    achieved_gflops: float
    achieved_gbytes_s: float
    roofline_fraction: float  # max(compute floor, memory floor) / measured step time
    quantization: str = "none"  # the weights' scheme as the runner resolved it


@dataclass
class EngineBenchResult:
    ceilings: Ceilings
    phases: list[Phase] = field(default_factory=list)
    batching_gain: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def resident_weight_bytes(model) -> int:
    """Bytes of the weights as the model holds them (packed integers where quantized)."""
    from tokenmill.models.linear_ops import PackedWeight
    from tokenmill.quant.packing import QuantizedWeight

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    seen = set()
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, QuantizedWeight | PackedWeight) and id(w) not in seen:
            seen.add(id(w))
            total += w.packed.nbytes
    return total


def _phase(name, dtype, llm, shapes, step_time, num_tokens, ceilings: Ceilings) -> Phase:
    arch = llm.engine.arch
    cost = step_cost(arch, shapes, Precision(weights=dtype))
    total_bytes = cost.total_bytes
    quantization = llm.engine.runner.quantization
    if quantization != "none":  # the packed integers stream instead of dtype weights
        model = llm.engine.runner.model
        total_bytes += resident_weight_bytes(model) - cost.bytes_by_kind["weights"]
    floor = max(cost.flops / ceilings.matmul_flops[dtype], total_bytes / ceilings.copy_bytes_per_s)
    return Phase(
        name=name, dtype=dtype, batch=len(shapes), tokens_per_s=num_tokens / step_time,
        step_time_s=step_time, gflop_per_step=cost.flops / 1e9,
        gbytes_per_step=total_bytes / 1e9, achieved_gflops=cost.flops / step_time / 1e9,
        achieved_gbytes_s=total_bytes / step_time / 1e9, roofline_fraction=floor / step_time,
        quantization=quantization,
    )  # fmt: skip


def _prompts(num: int, length: int, base: int = 1000) -> list[list[int]]:
    # Distinct token ids per request so the prefix cache never shortcuts the work.
    return [[base + (i * 7919 + j * 104729) % 40000 for j in range(length)] for i in range(num)]


def _prefill(llm, dtype, num, length, ceilings) -> Phase:
    from tokenmill import SamplingParams

    prompts = _prompts(num, length, base=1000 + num)
    llm.engine.step_trace.clear()
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    elapsed = time.perf_counter() - start
    # The whole prefill (however many steps it took) against the cost of all its prompts.
    shapes = [(length, 0)] * num
    phase = _phase(f"prefill {num}x{length} (all steps)", dtype, llm, shapes, elapsed, 0, ceilings)
    phase.tokens_per_s = num * length / elapsed
    return phase


def _decode(llm, dtype, batch, prompt_len, output_len, ceilings) -> Phase:
    from tokenmill import SamplingParams

    llm.engine.step_trace.clear()
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(_prompts(batch, prompt_len, base=3000 + batch), params, use_tqdm=False)
    decode_steps = [
        s for s in llm.engine.step_trace if not s.has_prompt_tokens and s.num_reqs == batch
    ]
    if not decode_steps:
        raise RuntimeError(
            f"no pure-decode step ran all {batch} requests together: raise the KV cache size"
        )
    step_time = statistics.median(s.wall_time_s for s in decode_steps)
    context = prompt_len + output_len // 2
    shapes = [(1, context)] * batch
    return _phase(f"decode batch {batch}", dtype, llm, shapes, step_time, batch, ceilings)


def _batching_gain(llm, num: int, prompt_len: int, output_len: int) -> dict[str, float]:
    from tokenmill import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    prompts = _prompts(num, prompt_len, base=5000)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    together = time.perf_counter() - start
    start = time.perf_counter()
    for p in prompts:
        llm.generate([p], params, use_tqdm=False)
    alone = time.perf_counter() - start
    tokens = num * output_len
    return {
        "requests": num,
        "concurrent_output_tok_s": tokens / together,
        "sequential_output_tok_s": tokens / alone,
        "gain": alone / together,
    }


def run(
    model: str | None = None,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    batch_sizes: tuple[int, ...] = (1, 64),
    output_len: int = 64,
    gain_requests: int = 64,
    kv_cache_gib: float = 4.0,
    quantizations: tuple[str, ...] = ("none",),
) -> EngineBenchResult:
    from tokenmill import LLM

    result = EngineBenchResult(ceilings=measure(dtypes))
    for dtype, quantization in [(d, q) for d in dtypes for q in quantizations]:
        llm = LLM(
            model, dtype=dtype, kv_cache_memory_gib=kv_cache_gib, max_num_seqs=max(batch_sizes),
            max_num_batched_tokens=2048, record_step_trace=True, quantization=quantization,
        )  # fmt: skip
        _decode(llm, dtype, 1, 16, 8, result.ceilings)  # warm-up
        result.phases.append(_prefill(llm, dtype, 1, 512, result.ceilings))
        result.phases.append(_prefill(llm, dtype, 64, 128, result.ceilings))
        for batch in batch_sizes:
            result.phases.append(_decode(llm, dtype, batch, 128, output_len, result.ceilings))
        if (dtype, quantization) == (dtypes[0], quantizations[0]) and gain_requests:
            result.batching_gain = _batching_gain(llm, gain_requests, 64, output_len)
            result.batching_gain["dtype"] = dtype
    return result


def format_markdown(result: EngineBenchResult) -> str:
    c = result.ceilings
    lines = [
        f"Ceilings ({c.device}, {c.threads} threads): "
        + ", ".join(f"matmul {k} {v / 1e9:.0f} GFLOP/s" for k, v in c.matmul_flops.items())
        + f", copy {c.copy_bytes_per_s / 1e9:.1f} GB/s (read + write)",
        "",
        "| phase | dtype | weights | tokens/s | step ms | GFLOP/step | GB/step | GFLOP/s | GB/s "
        "| roofline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result.phases:
        lines.append(
            f"| {p.name} | {p.dtype} | {p.quantization} | {p.tokens_per_s:.1f} | {p.step_time_s * 1e3:.1f} | "
            f"{p.gflop_per_step:.2f} | {p.gbytes_per_step:.3f} | {p.achieved_gflops:.0f} | "
            f"{p.achieved_gbytes_s:.1f} | {p.roofline_fraction:.0%} |"
        )
    g = result.batching_gain
    if g:
        lines += [
            "",
            f"Continuous batching ({g['dtype']}): {g['requests']} requests at once "
            f"{g['concurrent_output_tok_s']:.1f} output tok/s vs one at a time "
            f"{g['sequential_output_tok_s']:.1f} tok/s: {g['gain']:.1f}x",
        ]
    return "\n".join(lines)
