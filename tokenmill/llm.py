"""Offline batched generation, in the shape vLLM users know.

llm = LLM()                                   # the bundled SmolLM2-135M-Instruct
outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
outs[0].outputs[0].text
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from tokenmill.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tokenmill.engine.build import build_engine
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import OutputKind, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer.chat_template import with_end_of_turn

Prompt = str | list[int] | dict[str, Any]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        load_format: str = "auto",
        dummy_config: dict | str | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        device: str = "cpu",
        quantization: str = "none",
        block_size: int = 16,
        kv_cache_memory_gib: float = 1.0,
        kv_cache_dtype: str = "auto",
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        enable_chunked_prefill: bool = True,
        scheduling_policy: str = "fcfs",
        attention_backend: str = "auto",
        decode_graphs: str = "auto",
        cpu_fused_decode: bool = True,
        record_step_trace: bool = False,
        speculative_config: str | dict | None = None,
    ) -> None:
        config = EngineConfig(
            model=ModelConfig(
                model=model, dtype=dtype, load_format=load_format, dummy_config=dummy_config,
                max_model_len=max_model_len, seed=seed, device=device,
                quantization=quantization,
            ),
            cache=CacheConfig(
                block_size=block_size, kv_cache_memory_gib=kv_cache_memory_gib,
                num_blocks=num_kv_blocks, enable_prefix_caching=enable_prefix_caching,
                kv_cache_dtype=kv_cache_dtype,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                enable_chunked_prefill=enable_chunked_prefill, policy=scheduling_policy,
            ),
            attention_backend=attention_backend,
            decode_graphs=decode_graphs,
            cpu_fused_decode=cpu_fused_decode,
            record_step_trace=record_step_trace,
            speculative_config=speculative_config,
        )  # fmt: skip
        self.engine = build_engine(config)
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = engine
        llm._ids = itertools.count()
        return llm

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or {"prompt_token_ids": [...]}).

        Results come back in the order of `prompts`.
        """
        prompt_list = _as_prompt_list(prompts)
        params = _broadcast(
            sampling_params or SamplingParams(), len(prompt_list), "sampling_params"
        )
        priorities = list(priority) if priority is not None else [0] * len(prompt_list)
        ids = []
        try:
            for prompt, p, prio in zip(prompt_list, params, priorities, strict=True):
                request_id = str(next(self._ids))
                self.engine.add_request(
                    request_id, _prompt_value(prompt), p, priority=prio,
                    output_kind=OutputKind.FINAL_ONLY,
                )  # fmt: skip
                ids.append(request_id)
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a batch of them, through the chat template
        (`chat_template`, a jinja2 source, instead of the model's own if given). A reply ends at
        the template's end-of-turn token, which is not part of its text."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            tokenizer.apply_chat_template(
                conv, add_generation_prompt, tokenize=True, chat_template=chat_template,
                **(chat_template_kwargs or {}),
            )
            for conv in conversations
        ]  # fmt: skip
        params = _broadcast(sampling_params or SamplingParams(), len(prompts), "sampling_params")
        params = [with_end_of_turn(p, tokenizer, chat_template) for p in params]
        return self.generate(prompts, params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", disable=not use_tqdm or len(ids) < 8)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in final])
            raise
        finally:
            bar.close()
        return [final[i] for i in ids]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    if not prompts:
        raise InvalidRequestError("no prompts given")
    return prompts


def _prompt_value(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list | tuple):
        return list(prompt)
    raise InvalidRequestError(
        f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}"
    )


def _broadcast(value, n: int, name: str) -> list:
    if isinstance(value, SamplingParams):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise InvalidRequestError(f"{name} has {len(value)} entries for {n} prompts")
    return value
