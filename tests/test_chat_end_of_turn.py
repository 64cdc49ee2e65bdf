"""A chat reply ends at the chat template's end-of-turn token (Gemma's `<end_of_turn>`, ChatML's
`<|im_end|>`, ...), which is not part of its text, on every path that applies a template."""

from __future__ import annotations

import pytest

from tests._fixtures_loader import requires_gemma3
from tokenmill import LLM, SamplingParams
from tokenmill.engine.interfaces import BaseRunner
from tokenmill.engine.llm_engine import LLMEngine
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


class EndsTurnAfter(BaseRunner):
    """The real model, except that each request's `n`-th sampled token becomes <end_of_turn>.

    The bundled Gemma is the base model, which never predicts <end_of_turn> (log p < -12 at
    every turn end): this stands in for an instruction-tuned model ending its reply."""

    def __init__(self, inner: BaseRunner, n: int) -> None:
        self.inner, self.n = inner, n
        self.num_blocks = inner.num_blocks
        self._num_sampled: dict[str, int] = {}

    def execute(self, scheduler_output):
        out = self.inner.execute(scheduler_output)
        for req_id, tokens in out.sampled.items():
            before = self._num_sampled.get(req_id, 0)
            self._num_sampled[req_id] = before + len(tokens)
            if before < self.n <= before + len(tokens):
                tokens[self.n - before - 1] = END_OF_TURN
        return out


@requires_gemma3
def test_gemma_end_of_turn_ends_a_chat_reply(gemma3_fp32):
    base = gemma3_fp32.engine  # the real Gemma 3 in float32; its weights, a runner of our own
    runner = EndsTurnAfter(base.runner.sharing_weights(base.config), n=6)
    gemma3 = LLM.from_engine(LLMEngine(base.config, runner, base.loaded))
    tokenizer = gemma3.get_tokenizer()
    assert tokenizer.chat_template is None and END_OF_TURN not in tokenizer.eos_token_ids
    assert end_of_turn_token_ids(tokenizer) == (END_OF_TURN,)  # known by name
    assert end_of_turn_token_ids(tokenizer, GEMMA_TEMPLATE) == (END_OF_TURN,)
    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    params = SamplingParams(max_tokens=24, temperature=0)
    (out,) = gemma3.chat(messages, params, use_tqdm=False, chat_template=GEMMA_TEMPLATE)
    # Without the rule the same prompt runs on past <end_of_turn> to max_tokens.
    (free,) = gemma3.generate([out.prompt_token_ids], params, use_tqdm=False)
    assert free.outputs[0].finish_reason == "length"
    assert free.outputs[0].token_ids[5] == END_OF_TURN and len(free.outputs[0].token_ids) == 24
    reply = out.outputs[0]
    assert (reply.finish_reason, reply.stop_reason) == ("stop", END_OF_TURN)
    assert reply.token_ids == free.outputs[0].token_ids[:6]
    assert reply.text and "<end_of_turn>" not in reply.text
    assert reply.text == tokenizer.decode(reply.token_ids[:-1])
    prompt_text = tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert prompt_text.endswith("<end_of_turn>\n<start_of_turn>model\n")
