"""Offline throughput: a whole workload generated at once, with output lengths forced.

Every engine gets the same prompt token ids (tokenized once, with tokenmill's tokenizer of the
GGUF) and must produce exactly each request's output length (ignore_eos), so all do the same
useful work. Arrival times are ignored: everything is submitted at t=0.

- tokenmill: `LLM.generate` with continuous batching.
- Hugging Face transformers: `generate` over static batches of `batch_size` requests in workload
  order, left-padded, each batch running to its longest output (min_new_tokens = max_new_tokens,
  so EOS cannot end it early). Only the requested tokens count as output; the padding positions
  are computed anyway, which is what static batching costs.

Physics: the workload's FLOPs come from tokenmill.perf.step_cost over every request as one
causal sequence of prompt + output - 1 tokens with one lm_head row per output token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tokenmill.perf import Precision, step_cost
from tokenmill.workload import Workload


@dataclass
class OfflineResult:
    engine: str
    dtype: str
    num_requests: int
    input_tokens: int
    output_tokens: int  # requested (useful) output tokens actually produced
    elapsed_s: float
    load_s: float = 0.0
    computed_tokens: int = 0  # prompt + generated positions computed, padding included
    model_gflop: float = 0.0  # the workload's FLOPs (step_cost), padding not counted
    notes: dict = field(default_factory=dict)

    @property
    def request_throughput(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_token_throughput(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.elapsed_s

    @property
    def achieved_gflops(self) -> float:
        return self.model_gflop / self.elapsed_s

    def as_dict(self) -> dict:
        out = asdict(self)
        for name in ("request_throughput", "output_throughput", "total_token_throughput"):
            out[name] = getattr(self, name)
        out["achieved_gflops"] = self.achieved_gflops
        return out


def tokenize_workload(workload: Workload, tokenizer, seed: int = 0) -> list[list[int]]:
    """Prompt token ids of every request: its text tokenized, or random ids of its length."""
    from tokenmill.bench.serve import synthetic_prompt

    return [
        tokenizer.encode(r.prompt) if r.prompt is not None else synthetic_prompt(r.prompt_len, i)
        for i, r in enumerate(workload.requests)
    ]


def workload_gflop(
    arch, prompts: Sequence[Sequence[int]], output_lens: Sequence[int], dtype: str
) -> float:
    shapes = [(len(p) + o - 1, 0, o) for p, o in zip(prompts, output_lens, strict=True)]
    return step_cost(arch, shapes, Precision(weights=dtype)).flops / 1e9


def run_tokenmill(
    model: str | None,
    prompts: list[list[int]],
    output_lens: list[int],
    dtype: str = "bfloat16",
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 2048,
    kv_cache_memory_gib: float = 4.0,
    progress: bool = False,
) -> OfflineResult:
    from tokenmill import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model, dtype=dtype, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory_gib=kv_cache_memory_gib,
    )  # fmt: skip
    load_s = time.perf_counter() - start
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in output_lens]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    return OfflineResult(
        "tokenmill", dtype, len(prompts), sum(map(len, prompts)), produced, elapsed, load_s,
        computed_tokens=sum(len(p) + o - 1 for p, o in zip(prompts, output_lens, strict=True)),
        model_gflop=workload_gflop(llm.engine.arch, prompts, output_lens, dtype),
        notes={"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens},
    )  # fmt: skip


def load_transformers(gguf_path: str, dtype: str):
    """Hugging Face transformers' own GGUF loader: weights dequantized, then cast to `dtype`."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=getattr(torch, dtype)
    )
    return model.eval()


def run_transformers(
    gguf_path: str,
    prompts: list[list[int]],
    output_lens: list[int],
    dtype: str = "bfloat16",
    batch_size: int = 64,
    progress: bool = False,
) -> OfflineResult:
    import torch
    from tqdm import tqdm

    from tokenmill.bench.serve import open_model_info

    start = time.perf_counter()
    model = load_transformers(gguf_path, dtype)
    load_s = time.perf_counter() - start
    pad_id = model.config.eos_token_id
    pad_id = pad_id[0] if isinstance(pad_id, list) else (pad_id or 0)
    batches = [
        range(i, min(i + batch_size, len(prompts))) for i in range(0, len(prompts), batch_size)
    ]
    computed = produced = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for idx in tqdm(batches, desc="transformers", disable=not progress):
            ids, mask = _left_pad([prompts[i] for i in idx], pad_id)
            new = max(output_lens[i] for i in idx)
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=pad_id,
            )  # fmt: skip
            generated = out.shape[1] - ids.shape[1]
            produced += sum(min(output_lens[i], generated) for i in idx)
            computed += ids.numel() + len(idx) * (generated - 1)
    elapsed = time.perf_counter() - start
    arch = open_model_info(gguf_path).arch
    return OfflineResult(
        "transformers", dtype, len(prompts), sum(map(len, prompts)), produced, elapsed, load_s,
        computed_tokens=computed, model_gflop=workload_gflop(arch, prompts, output_lens, dtype),
        notes={"batch_size": batch_size, "static_batches": len(batches)},
    )  # fmt: skip


def _left_pad(prompts: list[list[int]], pad_id: int):
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, width)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def format_offline_markdown(
    results: Sequence[OfflineResult], matmul_gflops: float | None = None
) -> str:
    head = "| engine | dtype | requests | in tok | out tok | s | req/s | out tok/s | total tok/s | GFLOP/s |"
    lines = [
        head + (" of matmul peak |" if matmul_gflops else ""),
        "|---" * (10 + bool(matmul_gflops)) + "|",
    ]
    for r in results:
        row = (
            f"| {r.engine} | {r.dtype} | {r.num_requests} | {r.input_tokens} | {r.output_tokens} | "
            f"{r.elapsed_s:.1f} | {r.request_throughput:.2f} | {r.output_throughput:.1f} | "
            f"{r.total_token_throughput:.1f} | {r.achieved_gflops:.1f} |"
        )
        if matmul_gflops:
            row += f" {r.achieved_gflops / matmul_gflops:.0%} |"
        lines.append(row)
    return "\n".join(lines)
