"""The synchronous engine: add requests, call step(), read outputs.

    step():  schedule -> execute -> update (stop rules) -> detokenize (stop strings) -> outputs

The step's order is engine/step_core.py's, which the planner's simulator runs too; this class is
its host (outputs, counters) and owner of requests.

The async engine and the offline LLM class both drive this one loop.
"""

from __future__ import annotations

import logging
import time

from tokenmill.config import EngineConfig
from tokenmill.engine.interfaces import BaseRunner, RunnerOutput, SchedulerOutput
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.limits import check_prompt_fits
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.slo_predictor import StepTimePredictor, build_predictor
from tokenmill.engine.stats import EngineStats
from tokenmill.engine.step_core import StepCore
from tokenmill.errors import EngineOverloadedError, InvalidRequestError
from tokenmill.loader.base import LoadedModel
from tokenmill.outputs import OutputKind, RequestOutput
from tokenmill.perf.trace import StepRecord
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec.build import build_spec_decoder
from tokenmill.structured.compiler import with_compiled_grammar
from tokenmill.workload.slo import SLO, parse_slo

logger = logging.getLogger(__name__)


def child_id(request_id: str, index: int, n: int) -> str:
    """The scheduler's id of sample `index` of a request with `n` samples."""
    return request_id if n == 1 else f"{request_id}#{index}"


class LLMEngine:
    """Owns the scheduler, the KV cache manager and the output processor of one runner.

    The runner is built outside (`tokenmill.engine.build.build_engine` for a real model, the
    planner's SimRunner for a simulated one) and serves this engine alone. `predictor`: the
    step-time predictor of latency promises (default: the perf model of this machine).
    """

    def __init__(
        self,
        config: EngineConfig,
        runner: BaseRunner,
        loaded: LoadedModel | None = None,
        predictor: StepTimePredictor | None = None,
    ):
        self.config = config
        runner.bind(self)
        self.runner = runner
        self.loaded = loaded
        self.arch = loaded.arch if loaded is not None else None
        self.tokenizer = loaded.tokenizer if loaded is not None else None
        self.eos_token_ids = loaded.eos_token_ids if loaded is not None else ()
        block_size = config.cache.block_size
        self.max_model_len = self._max_model_len(runner.num_blocks * block_size)
        self.kv_manager = KVCacheManager(
            runner.num_blocks, block_size, config.cache.enable_prefix_caching
        )
        # Predicted step times: latency promises, and predicted vs measured in the metrics.
        self.predictor = predictor or build_predictor(self.arch, config.model.dtype)
        self.scheduler = Scheduler(
            config.scheduler, self.kv_manager, self.max_model_len, self.predictor
        )
        self.default_slo = parse_slo(config.scheduler.slo) if config.scheduler.slo else None
        self.output_processor = OutputProcessor(self.tokenizer)
        self.spec = build_spec_decoder(
            config, runner, loaded, self.predictor, self.max_model_len, self.scheduler
        )
        self.step_trace: list[StepRecord] = []
        self._num_generation_tokens = 0
        self._num_model_steps = 0
        self._prompt_step_time_s = 0.0
        self.core = StepCore(
            self.scheduler, runner, self, time.perf_counter, self._execute, self.predictor,
            self.spec, self.step_trace if config.record_step_trace else None,
        )  # fmt: skip

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
        check_prompt_fits(len(token_ids), self.max_model_len)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
        slo: SLO | None = None,
    ) -> None:
        """`output_kind`: what step() reports of this request (outputs.OutputKind): DELTA for
        streams, FINAL_ONLY for callers that never stream, like LLM.generate. `slo`: its latency
        targets (None: the engine's default; an SLO without targets: best effort); a request
        they cannot be promised to may be refused with SloUnattainableError."""
        text, token_ids = self.encode_prompt(prompt)
        self.validate_prompt_tokens(token_ids, params)
        params = with_compiled_grammar(params, self.tokenizer)
        if self.output_processor.has_request(request_id):
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        limit = self.config.scheduler.max_waiting
        if limit is not None and self.scheduler.num_waiting + params.n > limit:
            raise EngineOverloadedError(
                f"the waiting queue is full ({self.scheduler.num_waiting} of {limit} requests)"
            )
        arrival_time = time.time() if arrival_time is None else arrival_time
        children = [
            (child_id(request_id, i, params.n), params.for_child(i)) for i in range(params.n)
        ]
        slo = self.default_slo if slo is None else slo
        requests = [
            Request(cid, token_ids, cparams, self.eos_token_ids, arrival_time, priority, slo)
            for cid, cparams in children
        ]
        self.scheduler.admit(requests)  # may refuse: nothing is registered yet
        self.output_processor.add_request(
            request_id, text, token_ids, children, arrival_time, output_kind=output_kind
        )
        for request in requests:
            self.scheduler.add_request(request)

    def delivery_pace_s(self, request_id: str) -> float | None:
        """The least mean gap per token at which a promised request's stream is handed out
        (slo_max_jitter): its planned TPOT over the bound; None: as fast as it is computed."""
        config = self.config.scheduler
        if config.slo_max_jitter is None:
            return None
        requests = self.scheduler.requests  # the first sample's promise is every sample's
        request = requests.get(request_id) or requests.get(child_id(request_id, 0, 2))
        if request is None or not request.is_promised or request.is_best_effort:
            return None
        if not request.slo.tpot_s:
            return None
        return request.slo.tpot_s * config.slo_tpot_share / config.slo_max_jitter

    def abort_request(self, request_ids: str | list[str]) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            children = self.output_processor.remove(request_id)
            self.scheduler.finish_requests(children, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        kv, scheduler = self.kv_manager, self.scheduler
        return EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            num_kv_blocks=kv.num_blocks,
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits,
            num_prompt_tokens=self.output_processor.num_prompt_tokens_total,
            num_generation_tokens=self._num_generation_tokens,
            num_preemptions=scheduler.num_preemptions,
            num_model_steps=self._num_model_steps,
            prompt_step_time_s=self._prompt_step_time_s,
            slo=scheduler.slo_stats.snapshot(self.predictor.stats if self.predictor else None),
            spec=self.spec.counters.snapshot() if self.spec is not None else None,
        )

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (benchmarks that must not hit the cache); returns how many
        blocks were dropped. Refused while requests hold blocks."""
        if self.kv_manager.pool.num_used_blocks:
            raise RuntimeError("cannot reset the prefix cache while requests hold KV blocks")
        return self.kv_manager.reset_prefix_cache()

    # ---- the step ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        return self.core.step()

    def finish_step(
        self,
        sched_out: SchedulerOutput,
        runner_out: RunnerOutput | None,
        expired: list[Request],
        updated: list[Request],
    ) -> list[RequestOutput]:
        if runner_out is None:
            return self.output_processor.process(expired, {})[0] if expired else []
        for req_id, entries in runner_out.prompt_logprobs.items():
            self.output_processor.add_prompt_logprobs(req_id, entries)
        outputs, stopped = self.output_processor.process(expired + updated, runner_out.logprobs)
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return outputs

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

    def account_step(
        self, sched_out: SchedulerOutput, runner_out: RunnerOutput, seconds: float
    ) -> None:
        self._num_model_steps += 1
        if sched_out.num_prefill_tokens:
            self._prompt_step_time_s += seconds
        self._num_generation_tokens += sum(len(t) for t in runner_out.sampled.values())
