"""The ModelRunner: a real model on a device behind the BaseRunner interface."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import torch

from tokenmill.attention import kv_quant
from tokenmill.attention.backends.base import BaseAttentionBackend, quantized_kv_unsupported
from tokenmill.attention.backends.registry import get_backend
from tokenmill.attention.context import forward_context
from tokenmill.attention.kv_smoothing import smooth_keys
from tokenmill.config import EngineConfig
from tokenmill.engine.interfaces import (
    BaseRunner,
    NewRequestData,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    TokenLogprobs,
)
from tokenmill.errors import ConfigError
from tokenmill.loader.base import LoadedModel
from tokenmill.models.arch_config import ArchConfig
from tokenmill.models.registry import build_model
from tokenmill.models.weights import load_weights
from tokenmill.perf.kv_memory import num_kv_blocks
from tokenmill.quant.apply import quantize_model
from tokenmill.quant.schemes import resolve_quantization
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.compiler import GrammarMatcher
from tokenmill.worker import spec_verify
from tokenmill.worker.cpu_fused_decode import fused_decode_for
from tokenmill.worker.cuda_graphs import DecodeGraphs
from tokenmill.worker.input_batch import StepInputs, prepare_inputs
from tokenmill.worker.sampler import SamplingRow, batch_token_logprobs, greedy_tokens, sample

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _RequestState:
    """The runner's own copy of a request: its sampling state, block table and output tokens."""

    params: SamplingParams
    prompt_token_ids: list[int]
    generator: torch.Generator
    block_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    matcher: GrammarMatcher | None = None  # structured outputs: where it is in its grammar


class ModelRunner(BaseRunner):
    """Runs a model's forward pass, KV cache and sampling for one engine.

    `ModelRunner.load(loaded, config)` materialises a model from a checkpoint;
    `runner.sharing_weights(config)` builds another runner (its own KV cache and request state)
    over the same weights, for a second engine in one process.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        backend: BaseAttentionBackend,
        arch: ArchConfig,
        config: EngineConfig,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.model = model
        self.arch = arch
        self.config = config
        self.device = torch.device(config.model.device)
        self.dtype = TORCH_DTYPES[config.model.dtype]
        self.block_size = config.cache.block_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.backend = backend  # the attention backend the model was built with
        self._allocate_kv_cache(arch, config)
        if self.kv_dtype == torch.int8:
            smooth_keys(model)  # K's outlier channels into Q before the cache rounds K
        self._states: dict[str, _RequestState] = {}
        self.quantization = "none"  # the resolved scheme, set by load
        self._seed_source = random.Random(config.model.seed)
        self.graphs = self._decode_graphs(config.decode_graphs, config.scheduler.max_num_seqs)
        # The fused layer writes and reads a bf16 cache or an int8 / fp8 one with its scales.
        use_fused = config.cpu_fused_decode
        self.fused_decode = fused_decode_for(model, self.dtype, self.device) if use_fused else None

    def _allocate_kv_cache(self, arch: ArchConfig, config: EngineConfig) -> None:
        """All layers' KV cache in one allocation, sized by perf/kv_memory.py; a quantized cache
        (int8 / fp8) with its scales beside it (attention/kv_quant.py)."""
        kv_dtype = config.cache.kv_cache_dtype
        kv_dtype = config.model.dtype if kv_dtype == "auto" else kv_dtype
        self.kv_dtype = TORCH_DTYPES.get(kv_dtype) or kv_quant.KV_QUANT_DTYPES[kv_dtype]
        if kv_quant.is_quantized(self.kv_dtype) and not self.backend.reads_quantized_kv:
            raise ConfigError(quantized_kv_unsupported(self.backend.name))
        self.num_blocks = config.cache.num_blocks or num_kv_blocks(
            arch, self.block_size, kv_quant.memory_format(kv_dtype),
            config.cache.kv_cache_memory_gib,
        )  # fmt: skip
        # One extra block past num_blocks belongs to no request: padding rows of captured decode
        # graphs write and read there.
        self.scratch_block = self.num_blocks
        shape = (
            arch.num_hidden_layers, 2, self.num_blocks + 1, self.block_size,
            arch.num_key_value_heads, arch.head_dim,
        )  # fmt: skip
        self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.kv_caches = [
            self.kv_cache[i] for i in range(shape[0])
        ]  # per layer [2, NB, BS, Hkv, D]
        self.kv_scales = self.kv_scale_caches = None
        nbytes = self.kv_cache.nbytes
        if kv_quant.is_quantized(self.kv_dtype):
            # (L, 2, NB, Hkv, BS): one scale per (slot, KV head); per layer [2, NB, Hkv, BS]
            scale_shape = (*shape[:3], arch.num_key_value_heads, self.block_size)
            self.kv_scales = torch.zeros(
                scale_shape, dtype=kv_quant.SCALE_DTYPE, device=self.device
            )
            self.kv_scale_caches = [self.kv_scales[i] for i in range(shape[0])]
            nbytes += self.kv_scales.nbytes
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB, %s)",
            self.num_blocks, self.block_size, nbytes / 2**30, self.kv_dtype,
        )  # fmt: skip

    @classmethod
    def load(cls, loaded: LoadedModel, config: EngineConfig) -> ModelRunner:
        """Build the model on the meta device, materialise it and fill it from the checkpoint."""
        device = torch.device(config.model.device)
        dtype = TORCH_DTYPES[config.model.dtype]
        backend = get_backend(config.attention_backend, config.model.device)
        start = time.perf_counter()
        with torch.device("meta"):
            model = build_model(loaded.arch, backend)
        model = model.to_empty(device=device).to(dtype)
        _reset_buffers(model)
        load_weights(model, loaded.iter_weights(dtype))  # one tensor at a time
        model.eval()
        scheme = resolve_quantization(config.model.quantization, loaded, config.model.device)
        if scheme.kind != "none":
            quantize_model(model, loaded, scheme)
        runner = cls(model, backend, loaded.arch, config, loaded.eos_token_ids)
        runner.quantization = scheme.name
        runner.warm_up()
        logger.info("loaded %s in %.1fs", loaded.source, time.perf_counter() - start)
        return runner

    def warm_up(self) -> None:
        """A short prompt and one decode step in the scratch block, so the first request does
        not pay for what runs once (packing weights for the native GEMMs, first allocations)."""
        prompt = [self.arch.bos_token_id or 0] * min(8, self.block_size - 1)
        params = SamplingParams(max_tokens=2, temperature=0, seed=0)  # draws no engine seed
        steps = [
            SchedulerOutput(
                [ScheduledRequest("warm-up", prompt, 0, [self.scratch_block], do_sample=True)],
                [NewRequestData("warm-up", prompt, params)], [],
            ),
            SchedulerOutput([ScheduledRequest("warm-up", [0], len(prompt), [], True, 1)], [], []),
            SchedulerOutput([], [], ["warm-up"]),
        ]  # fmt: skip
        for step in steps:
            self.execute(step)

    def sharing_weights(self, config: EngineConfig) -> ModelRunner:
        """A new runner over this one's weights (read-only), with its own KV cache and state."""
        same = (config.model.device, config.model.dtype, config.attention_backend)
        if same != (str(self.device), self.config.model.dtype, self.config.attention_backend):
            raise ValueError("a runner sharing weights needs the same device, dtype and backend")
        if config.model.quantization != self.config.model.quantization:
            raise ValueError("a runner sharing weights needs the same quantization")
        runner = ModelRunner(self.model, self.backend, self.arch, config, self.eos_token_ids)
        runner.quantization = self.quantization
        return runner

    def _decode_graphs(self, mode: str, max_num_seqs: int) -> DecodeGraphs | None:
        use = mode == "no-capture" or (
            mode == "auto" and self.device.type == "cuda" and self.backend.name == "triton"
        )
        if not use or self.backend.name != "triton":
            return None
        max_len = min(self.arch.max_position_embeddings, self.num_blocks * self.block_size)
        return DecodeGraphs(
            self.model, self.kv_caches, self.block_size, -(-max_len // self.block_size),
            self.scratch_block, max_num_seqs, capture=mode == "auto",
        )  # fmt: skip

    @torch.inference_mode()
    def execute(self, sched_out: SchedulerOutput) -> RunnerOutput:
        for req_id in sched_out.finished_req_ids:
            self._states.pop(req_id, None)
        for new in sched_out.new_requests:
            self._states[new.req_id] = self._new_state(new)
        if sched_out.is_empty:
            return RunnerOutput(sampled={})
        tables = []
        for sched in sched_out.scheduled:
            table = self._states[sched.req_id].block_ids
            # Idempotent (a step retried request by request applies the same diff again).
            del table[sched.block_table_start :]
            table.extend(sched.new_block_ids)
            tables.append(table)
        inputs = prepare_inputs(
            sched_out.scheduled, tables, self.block_size, self.device,
            lambda rid: self._states[rid].params.prompt_logprobs is not None,
        )  # fmt: skip
        if self.graphs is not None and self.graphs.can_run(inputs):
            hidden = self.graphs.run(inputs)  # (B, E)
        elif self.fused_decode is not None and self.fused_decode.can_run(inputs):
            hidden = self.fused_decode.run(inputs, self.kv_caches, self.kv_scale_caches)  # (B, E)
        else:
            with forward_context(inputs.metadata, self.kv_caches, self.kv_scale_caches):
                hidden = self.model(inputs.input_ids, inputs.positions)  # (T, E)
        rows = hidden[inputs.logits_indices]  # (N, E)
        if inputs.draft_rows:
            out = spec_verify.verify(self, sched_out, inputs, rows)
        elif self._plain_greedy_in_order(sched_out, inputs, rows.shape[0]):
            out = self._greedy(sched_out, inputs, rows)
        else:
            out = self._sample(sched_out, inputs, self.model.compute_logits(rows))  # (N, V)
        for req_id, tokens in out.sampled.items():
            self._states[req_id].output_token_ids.extend(tokens)
        return out

    def _new_state(self, new: NewRequestData) -> _RequestState:
        seed = new.sampling_params.seed
        if seed is None:
            seed = self._seed_source.getrandbits(63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        grammar = new.sampling_params.grammar
        matcher = grammar.compiled.new_matcher() if grammar and grammar.compiled else None
        return _RequestState(new.sampling_params, new.prompt_token_ids, generator, matcher=matcher)

    def _sample(self, sched_out: SchedulerOutput, inputs: StepInputs, logits) -> RunnerOutput:
        out = RunnerOutput(sampled={})
        for b, (row_start, row_end) in inputs.prompt_logprob_rows.items():
            sched = sched_out.scheduled[b]
            out.prompt_logprobs[sched.req_id] = self._prompt_logprobs(
                sched, logits[row_start:row_end]
            )
        if not inputs.sample_rows:
            return out
        rows, forbidden = [], []
        for b, _ in inputs.sample_rows:
            sched = sched_out.scheduled[b]
            state = self._states[sched.req_id]
            rows.append(
                SamplingRow(
                    state.params,
                    state.generator,
                    state.prompt_token_ids,
                    state.output_token_ids,
                    state.matcher,
                )  # fmt: skip
            )
            can_stop = state.params.can_stop(len(state.output_token_ids))
            banned = () if can_stop else (*self.eos_token_ids, *state.params.stop_token_ids)
            forbidden.append([t for t in banned if t < logits.shape[1]])
        row_idx = [row for _, row in inputs.sample_rows]
        if row_idx != list(range(logits.shape[0])):  # indexing copies: `sample` may write
            logits = logits[torch.tensor(row_idx, device=logits.device)]
        tokens, logprobs = sample(logits, rows, forbidden)
        for (b, _), token, lp in zip(inputs.sample_rows, tokens, logprobs, strict=True):
            req_id = sched_out.scheduled[b].req_id
            out.sampled[req_id] = [token]
            if lp is not None:
                out.logprobs[req_id] = [lp]
        return out

    def _greedy(self, sched_out: SchedulerOutput, inputs: StepInputs, rows) -> RunnerOutput:
        """Argmax only (no masks, penalties or logprobs): no sampling rows, and no logits at all
        where the model has a fused lm_head + argmax."""
        fused = getattr(self.model, "greedy_tokens", None)
        tokens = fused(rows) if fused is not None else None
        if tokens is None:
            tokens = greedy_tokens(self.model.compute_logits(rows))
        out = RunnerOutput(sampled={})
        for (b, _), token in zip(inputs.sample_rows, tokens.tolist(), strict=True):
            out.sampled[sched_out.scheduled[b].req_id] = [token]
        return out

    def _plain_greedy_in_order(
        self, sched_out: SchedulerOutput, inputs: StepInputs, num_rows: int
    ) -> bool:
        """Every row samples greedily with nothing to mask, penalise or report (prompt logprobs
        included), rows in hidden-state order."""
        if inputs.prompt_logprob_rows or not inputs.sample_rows:
            return False
        if len(inputs.sample_rows) != num_rows:
            return False
        for i, (b, row) in enumerate(inputs.sample_rows):
            state = self._states[sched_out.scheduled[b].req_id]
            if row != i or not state.params.is_plain_greedy:
                return False
            if not state.params.can_stop(len(state.output_token_ids)):
                return False  # EOS and stop ids are still forbidden
        return True

    # observer(req_id, position of row 0, logits [Q, V]) sees every prompt chunk whose prompt
    # logprobs are computed, all vocabulary scores, read-only: for measurements that teacher-force
    # text through the real forward and KV cache (tokenmill/quant_eval). None when serving.
    prompt_logits_observer = None

    def _prompt_logprobs(self, sched, logits: torch.Tensor) -> list[TokenLogprobs | None]:
        """logits [Q, V] of a prompt chunk; row i scores the prompt token after position i."""
        if self.prompt_logits_observer is not None:
            self.prompt_logits_observer(sched.req_id, sched.num_computed_tokens, logits)
        state = self._states[sched.req_id]
        prompt = state.prompt_token_ids
        num_rows = min(logits.shape[0], len(prompt) - 1 - sched.num_computed_tokens)
        if num_rows <= 0:
            return []
        start = sched.num_computed_tokens + 1
        targets = torch.tensor(prompt[start : start + num_rows], device=logits.device)
        return batch_token_logprobs(logits[:num_rows], targets, state.params.prompt_logprobs)

    def shutdown(self) -> None:
        self._states.clear()


def _reset_buffers(model: torch.nn.Module) -> None:
    """Buffers (rotary tables) were created on the meta device; modules rebuild them here."""
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
