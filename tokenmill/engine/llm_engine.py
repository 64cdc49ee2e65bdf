"""The synchronous engine: add requests, call step(), read outputs.

    step():  schedule -> execute -> update (stop rules) -> detokenize (stop strings) -> outputs

The async engine and the offline LLM class both drive this one loop.
"""

from __future__ import annotations

import logging
import time

from tokenmill.config import EngineConfig
from tokenmill.engine.interfaces import BaseRunner, RunnerOutput, SchedulerOutput
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.errors import (
    ContextLengthError,
    EngineOverloadedError,
    InvalidRequestError,
)
from tokenmill.outputs import RequestOutput
from tokenmill.perf.trace import StepRecord
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: BaseRunner | None = None, loaded=None):
        self.config = config
        if runner is None:
            from tokenmill.loader.registry import open_model
            from tokenmill.worker.model_runner import ModelRunner

            loaded = open_model(config.model)
            runner = ModelRunner(
                loaded, config.model, config.cache, config.attention_backend,
                eos_token_ids=loaded.arch.eos_token_ids or _tokenizer_eos(loaded.tokenizer),
                decode_graphs=config.decode_graphs, max_num_seqs=config.scheduler.max_num_seqs,
                cpu_fused_decode=config.cpu_fused_decode,
            )  # fmt: skip
        self.runner = runner
        self.loaded = loaded
        self.arch = loaded.arch if loaded is not None else None
        self.tokenizer = loaded.tokenizer if loaded is not None else None
        self.eos_token_ids = tuple(
            (self.arch.eos_token_ids if self.arch else ()) or _tokenizer_eos(self.tokenizer)
        )
        # A config may use fewer blocks than the runner allocated (tests, shared runners).
        num_blocks = min(runner.num_blocks, config.cache.num_blocks or runner.num_blocks)
        block_size = config.cache.block_size
        self.max_model_len = self._max_model_len(num_blocks * block_size)
        self.kv_manager = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, self.max_model_len)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.step_trace: list[StepRecord] = []
        self.num_generation_tokens_total = 0  # tokens sampled
        self.num_computed_tokens_total = 0  # tokens run through the model (work done)
        self.prompt_step_time_total_s = 0.0  # wall time of the steps that computed prompt tokens
        self._kv_token = object()  # which engine last wrote the runner's KV memory

    def _max_model_len(self, cache_tokens: int) -> int:
        limit = self.arch.max_position_embeddings if self.arch else cache_tokens
        if self.config.model.max_model_len:
            limit = min(limit, self.config.model.max_model_len)
        if cache_tokens < limit:
            logger.warning(
                "KV cache holds %d tokens, fewer than the context length %d: requests are "
                "limited to %d tokens so that any one of them always fits",
                cache_tokens, limit, cache_tokens,
            )  # fmt: skip
        return min(limit, cache_tokens)

    # ---- requests ----------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids")
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    def validate_prompt_tokens(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt is empty (it has no tokens)")
        vocab = self.arch.vocab_size if self.arch else None
        for t in token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0 or (vocab and t >= vocab):
                raise InvalidRequestError(
                    f"prompt token id {t!r} is out of range: ids must be integers in [0, {vocab})"
                )
        if len(token_ids) >= self.max_model_len:
            raise ContextLengthError(
                f"prompt has {len(token_ids)} tokens but the context window is "
                f"{self.max_model_len} tokens: at most {self.max_model_len - 1} prompt tokens fit"
            )

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        final_only: bool = False,
    ) -> None:
        """`final_only`: step() reports this request once, when it finishes (callers that
        never stream, like LLM.generate, skip building an output per token)."""
        text, token_ids = self.encode_prompt(prompt)
        self.validate_prompt_tokens(token_ids, params)
        if self.output_processor.has_request(request_id):
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        limit = self.config.scheduler.max_waiting
        if limit is not None and self.scheduler.num_waiting + params.n > limit:
            raise EngineOverloadedError(
                f"the waiting queue is full ({self.scheduler.num_waiting} of {limit} requests)"
            )
        arrival_time = time.time() if arrival_time is None else arrival_time
        children = [
            (request_id if params.n == 1 else f"{request_id}#{i}", params.for_child(i))
            for i in range(params.n)
        ]
        self.output_processor.add_request(
            request_id, text, token_ids, children, arrival_time, final_only=final_only
        )
        for child_id, child_params in children:
            self.scheduler.add_request(
                Request(
                    child_id, token_ids, child_params, self.eos_token_ids, arrival_time, priority
                )
            )

    def abort_request(self, request_ids: str | list[str]) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            children = self.output_processor.remove(request_id)
            self.scheduler.finish_requests(children, RequestStatus.FINISHED_ABORTED)

    @property
    def num_prompt_tokens_total(self) -> int:
        """Prompt tokens of requests that got their first token, prefix-cache hits included
        (vLLM's meaning of the prompt-token counter)."""
        return self.output_processor.num_prompt_tokens_total

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        self._claim_kv_memory()
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            if sched_out.finished_req_ids:
                self.runner.execute(sched_out)  # lets the runner drop finished state
            return []
        runner_out = self._execute(sched_out)
        touched = self.scheduler.update_from_output(sched_out, runner_out)
        for req_id, entries in runner_out.prompt_logprobs.items():
            self.output_processor.add_prompt_logprobs(req_id, entries)
        outputs, stopped = self.output_processor.process(touched, runner_out.logprobs)
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        # The whole step (schedule, forward, sampling, detokenization): what the planner models.
        self._account(sched_out, runner_out, time.perf_counter() - start)
        return outputs

    def _claim_kv_memory(self) -> None:
        """Engines that share a runner share its KV memory: when another engine has written it
        since this one last stepped, none of this engine's cached prefixes can be trusted."""
        owner = getattr(self.runner, "kv_owner", None)
        if owner is self._kv_token:
            return
        if owner is not None:
            if self.kv_manager.pool.num_used_blocks:
                raise RuntimeError(
                    "another engine ran on this model runner while this engine had requests "
                    "in flight; their KV blocks were overwritten"
                )
            dropped = self.kv_manager.reset_prefix_cache()
            logger.debug("runner's KV memory changed hands: dropped %d cached blocks", dropped)
        self.runner.kv_owner = self._kv_token

    def _execute(self, sched_out: SchedulerOutput) -> RunnerOutput:
        try:
            return self.runner.execute(sched_out)
        except Exception:
            logger.exception(
                "step failed; retrying its %d requests one by one", len(sched_out.scheduled)
            )
        # Isolate the fault: rerun each request alone (rewriting the same K/V is harmless).
        merged = RunnerOutput(sampled={})
        for sched in sched_out.scheduled:
            alone = SchedulerOutput(scheduled=[sched], new_requests=[], finished_req_ids=[])
            try:
                out = self.runner.execute(alone)
            except Exception as exc:  # noqa: BLE001 - any fault fails this request alone
                merged.failed[sched.req_id] = f"internal error: {type(exc).__name__}: {exc}"
                continue
            merged.sampled.update(out.sampled)
            merged.logprobs.update(out.logprobs)
            merged.prompt_logprobs.update(out.prompt_logprobs)
        if merged.failed:
            self.kv_manager.rollback_step()
        return merged

    def _account(self, sched_out: SchedulerOutput, runner_out: RunnerOutput, wall: float) -> None:
        self.num_computed_tokens_total += sched_out.num_scheduled_tokens
        if sched_out.num_prefill_tokens:
            self.prompt_step_time_total_s += wall
        self.num_generation_tokens_total += sum(len(t) for t in runner_out.sampled.values())
        if self.config.record_step_trace:
            self.step_trace.append(StepRecord.from_scheduler_output(sched_out, wall))


def _tokenizer_eos(tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer.eos_token_ids) if tokenizer is not None else ()
