"""Gemma 3 270M (GGUF, Q4_K_M) against Hugging Face transformers loading the same GGUF: the
config and every float32 weight equal, and tokenmill's next-token distributions match, including
past the 512-token sliding window. (One module, so that under xdist the ~50 CPU-s transformers
load happens on one worker.)"""

from __future__ import annotations

import os

import pytest
import torch

from tests._fixtures_loader import requires_gemma3
from tokenmill import SamplingParams
from tokenmill.loader.gguf_loader import open_gguf


@pytest.fixture(scope="module")
def gemma3_hf_model(gemma3_path):
    """Hugging Face transformers loading the Gemma 3 GGUF in float32 (~15 s), for this module
    only: its ~1 GB goes when the module ends, not when the worker's whole session does."""
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(gemma3_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


@pytest.mark.slow
def test_gemma3_matches_transformers(gemma3_fp32, gemma3_hf_model, sharegpt_prompts):
    ref, llm = gemma3_hf_model, gemma3_fp32  # both float32, loaded once per module or session
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


@requires_gemma3
@pytest.mark.slow
def test_gemma3_config_matches_transformers(gemma3_path, gemma3_hf_model):
    ref = gemma3_hf_model.config  # what AutoConfig.from_pretrained reads from the GGUF
    arch = open_gguf(gemma3_path, with_tokenizer=False).arch
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "sliding_window",
        "max_position_embeddings",
        "query_pre_attn_scalar",
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "tie_word_embeddings",
    ):
        assert getattr(arch, field) == getattr(ref, field), field
    assert arch.hidden_act == ref.hidden_activation
    assert arch.rope_theta == ref.rope_parameters["full_attention"]["rope_theta"]
    assert arch.rope_local_base_freq == ref.rope_parameters["sliding_attention"]["rope_theta"]
    sliding = [
        "full_attention" if (i + 1) % arch.sliding_window_pattern == 0 else "sliding_attention"
        for i in range(arch.num_hidden_layers)
    ]
    assert sliding == ref.layer_types


@requires_gemma3
@pytest.mark.slow
def test_gemma3_weights_equal_transformers(gemma3_path, gemma3_hf_model):
    ref_sd = gemma3_hf_model.state_dict()
    ours = dict(open_gguf(gemma3_path, with_tokenizer=False).iter_weights(torch.float32))
    assert set(ref_sd) - set(ours) == {"lm_head.weight"}
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref_sd[name]), name
