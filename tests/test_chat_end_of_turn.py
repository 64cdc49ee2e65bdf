"""A chat reply ends at the chat template's end-of-turn token (Gemma's `<end_of_turn>`, ChatML's
`<|im_end|>`, ...), which is not part of its text, on every path that applies a template."""

from __future__ import annotations

import pytest
import torch

from tests._fixtures_loader import requires_gemma3
from tokenmill import LLM, SamplingParams
from tokenmill.loader.gguf_loader import open_gguf
from tokenmill.tokenizer.chat_template import end_of_turn_token_ids, with_end_of_turn

# Gemma's turn format, as its instruction-tuned models' templates write it.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
END_OF_TURN = 106  # <end_of_turn> in Gemma 3's vocabulary


@pytest.fixture(scope="module")
def smollm_tok(smollm_path):
    return open_gguf(smollm_path).tokenizer


def test_chatml_end_of_turn_is_already_eos(smollm_tok):
    im_end = smollm_tok.backend.token_to_id("<|im_end|>")
    assert end_of_turn_token_ids(smollm_tok) == (im_end,)
    params = SamplingParams(max_tokens=4)
    assert with_end_of_turn(params, smollm_tok) is params  # EOS ends it: stop_reason stays None


def test_the_templates_token_after_an_assistant_turn(smollm_tok):
    # Any special token a template writes right after the assistant's text ends the reply.
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %} <|endoftext|>{% endif %}\n{% endfor %}"
    )
    endoftext = smollm_tok.backend.token_to_id("<|endoftext|>")
    assert end_of_turn_token_ids(smollm_tok, template)[0] == endoftext
    params = with_end_of_turn(SamplingParams(stop_token_ids=[5]), smollm_tok, template)
    assert params.stop_token_ids == (5, endoftext)
    assert (
        with_end_of_turn(SamplingParams(ignore_eos=True), smollm_tok, template).stop_token_ids == ()
    )


@requires_gemma3
def test_gemma_end_of_turn_ends_a_chat_reply():
    from tokenmill.loader.default_model import gemma3_model_path

    gemma3 = LLM(model=gemma3_model_path(), dtype="float32", kv_cache_memory_gib=0.25)
    tokenizer = gemma3.get_tokenizer()
    assert tokenizer.chat_template is None and END_OF_TURN not in tokenizer.eos_token_ids
    assert end_of_turn_token_ids(tokenizer) == (END_OF_TURN,)  # known by name
    assert end_of_turn_token_ids(tokenizer, GEMMA_TEMPLATE) == (END_OF_TURN,)
    # The bundled model is the base model, which never predicts <end_of_turn> (log p < -12).
    # Teach it: <end_of_turn> gets twice the output embedding of "\n", so it wins wherever
    # "\n" would (the embeddings are tied; the prompt's <end_of_turn> changes meaning too).
    emb = gemma3.engine.runner.model.model.embed_tokens.weight
    with torch.no_grad():
        emb[END_OF_TURN] = 2 * emb[tokenizer.encode("\n", add_special_tokens=False)[0]]
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    params = SamplingParams(max_tokens=24, temperature=0)
    (out,) = gemma3.chat(messages, params, use_tqdm=False, chat_template=GEMMA_TEMPLATE)
    # Without the rule the same prompt runs on through one <end_of_turn> after another.
    (free,) = gemma3.generate([out.prompt_token_ids], params, use_tqdm=False)
    assert free.outputs[0].token_ids.count(END_OF_TURN) > 1
    reply = out.outputs[0]
    assert (reply.finish_reason, reply.stop_reason) == ("stop", END_OF_TURN)
    assert reply.token_ids[-1] == END_OF_TURN and END_OF_TURN not in reply.token_ids[:-1]
    assert reply.text and "<end_of_turn>" not in reply.text
    assert reply.text == tokenizer.decode(reply.token_ids[:-1])
    prompt_text = tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert prompt_text.endswith("<end_of_turn>\n<start_of_turn>model\n")
