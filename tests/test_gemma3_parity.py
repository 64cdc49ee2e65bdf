"""Gemma 3 270M (GGUF, Q4_K_M) in float32: tokenmill's next-token distributions match Hugging
Face transformers loading the same GGUF, including past the 512-token sliding window."""

from __future__ import annotations

import pytest
import torch

from tokenmill import SamplingParams


@pytest.mark.slow
def test_gemma3_matches_transformers(gemma3_fp32, gemma3_hf_model, sharegpt_prompts):
    ref, llm = gemma3_hf_model, gemma3_fp32  # both float32, loaded once (conftest)
    tokenizer = llm.get_tokenizer()
    long_text = " ".join(sharegpt_prompts[:40])
    prompts = [
        tokenizer.encode("The capital of France is"),
        tokenizer.encode(sharegpt_prompts[3])[:200],
        tokenizer.encode(long_text)[:700],  # crosses the sliding window of the local layers
    ]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, logprobs=1)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    worst = 0.0
    for ids, out in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            logprobs = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)
        ours = out.prompt_logprobs[1:] + [out.outputs[0].logprobs[0]]
        for pos, entry in enumerate(ours):
            top_id, top = min(entry.items(), key=lambda item: item[1].rank)
            ref_top = int(logprobs[pos].argmax())
            # Near-ties may swap; where they do, both must be near-equal for both models.
            if top_id != ref_top:
                gap = float(logprobs[pos, ref_top] - logprobs[pos, top_id])
                assert gap < 1e-3, f"position {pos}: top-1 differs by {gap}"
            worst = max(worst, abs(top.logprob - float(logprobs[pos, top_id])))
    assert worst < 2e-3, worst
