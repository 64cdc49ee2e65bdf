"""One frozen configuration tree for the engine, validated on construction.

Values discovered at run time (how many KV blocks fit, the model's context length) are returned
by the components that discover them and passed on; they are never written back into a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
# A KV cache in a model dtype, or quantized (int8, fp8 = fp8_e4m3) with one scale per (token,
# KV head): tokenmill/attention/kv_quant.py.
KV_CACHE_DTYPES = (*DTYPES, "int8", "fp8", "fp8_e4m3")
# What the engine does with a request its latency promise cannot be kept for (SchedulerConfig).
SLO_POLICIES = ("reject", "queue", "best-effort", "off")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how. `model=None` means the bundled default (SmolLM2-135M)."""

    model: str | None = None
    # "auto": bfloat16 on CPUs that compute it natively, float32 on other CPUs, the checkpoint's
    # own dtype on a GPU (settled when the engine is built; tokenmill/engine/build.py).
    dtype: str = "auto"
    load_format: str = "auto"  # auto | gguf | hf | dummy
    # For load_format="dummy": a Hugging Face style config (dict or config.json path).
    dummy_config: dict | str | None = None
    max_model_len: int | None = None  # None: the model's own context length
    seed: int = 0
    device: str = "cpu"
    # Which weights the model computes on: none | gguf | int8[-gN] | int4[-gN][-sym] | auto;
    # the integer ones with -a16 take activations in two int8 passes
    # (tokenmill/quant/schemes.py).
    quantization: str = "none"

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"dtype must be auto or one of {DTYPES}, got {self.dtype!r}")
        if self.load_format not in ("auto", "gguf", "hf", "dummy"):
            raise ConfigError(
                f"load_format must be auto, gguf, hf or dummy, got {self.load_format!r}"
            )
        if self.load_format == "dummy" and self.dummy_config is None and self.model is None:
            raise ConfigError(
                "load_format='dummy' needs dummy_config (a config dict or config.json)"
            )
        from tokenmill.quant.schemes import parse_quantization

        if self.quantization is None:  # vLLM's spelling of "no quantization"
            object.__setattr__(self, "quantization", "none")  # frozen
        parse_quantization(self.quantization)  # a clear error for a misspelt scheme
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Memory for the paged KV cache in GiB; the number of blocks is computed from it.
    kv_cache_memory_gib: float = 1.0
    # Set to force an exact number of blocks (tests, simulation); overrides the memory budget.
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # auto = the model dtype; or one of KV_CACHE_DTYPES

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_memory_gib <= 0:
            raise ConfigError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_dtype not in ("auto", *KV_CACHE_DTYPES):
            raise ConfigError(
                f"kv_cache_dtype must be auto or one of {KV_CACHE_DTYPES}, "
                f"got {self.kv_cache_dtype!r}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # fcfs | priority
    # Anti-starvation: a request preempted this many times is only chosen as a victim when no
    # other running request can be.
    max_preemptions_before_protected: int = 2
    # Bound on waiting requests; the engine refuses work beyond it (the server answers 429).
    max_waiting: int | None = None
    # Latency promises (engine/slo_admission.py): the default SLO of requests that set none, in
    # workload/slo.py's syntax ("ttft=2s,tpot=100ms"), and what to do with a request the
    # predictor says cannot meet it: reject (429 at once), queue (wait while its TTFT still can
    # be met), best-effort (serve it without a promise), off (no admission control: FCFS).
    slo: str | None = None
    slo_policy: str = "off"
    # Steps are planned to this share of the tightest promised TPOT: measured step times scatter
    # around the predictor's (this machine: a few %, more under other load), and a request's
    # TPOT is the mean of its steps, so steps planned to the promise itself miss it about half
    # the time. 1.0 plans to the promise exactly (an exact predictor, as in the planner's tests).
    slo_tpot_share: float = 0.85
    # Prompts are planned to finish by this share of the TTFT: a step with prompt tokens runs
    # over its prediction by ~11% at p90 on this machine, and a promised prompt is a run of
    # them (BENCHMARKS.md section 11, run 4).
    slo_ttft_share: float = 0.9
    # Bounded jitter: a promised request's stream is handed out no faster than its planned TPOT
    # / slo_max_jitter per token (engine/request_stream.py; the engine still computes at full
    # speed), so its TPOT as the client sees it lies between that and the planned TPOT. None:
    # tokens are handed out as they are computed.
    slo_max_jitter: float | None = None
    # Priority preemption: a running request is preempted for a more important one at most this
    # many times.
    max_priority_preemptions: int = 2
    # While requests wait, a running prompt's chunk takes at most this many tokens of a step, so
    # a long prompt does not hold new requests back until it ends (vLLM's name). None: half of
    # max_num_batched_tokens; 0: no cap.
    long_prefill_token_threshold: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.policy not in ("fcfs", "priority"):
            raise ConfigError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ConfigError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.slo_policy not in SLO_POLICIES:
            raise ConfigError(
                f"slo_policy must be one of {', '.join(SLO_POLICIES)}, got {self.slo_policy!r}"
            )
        for name in ("slo_tpot_share", "slo_ttft_share"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.slo_max_jitter is not None and not self.slo_max_jitter >= 1.0:
            raise ConfigError(f"slo_max_jitter must be >= 1, got {self.slo_max_jitter}")
        if self.slo is not None:
            from tokenmill.workload.slo import parse_slo

            parse_slo(self.slo)  # a clear error for a malformed SLO
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 0:
            raise ConfigError(
                "long_prefill_token_threshold must be >= 0, got "
                f"{self.long_prefill_token_threshold}"
            )
        if self.max_priority_preemptions < 0:
            raise ConfigError(
                f"max_priority_preemptions must be >= 0, got {self.max_priority_preemptions}"
            )


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: str = "auto"  # auto | torch | triton
    # Pure-decode steps replay CUDA graphs: "auto" (on CUDA with the Triton backend), "off", or
    # "no-capture" (the same static-buffer path run eagerly; for tests without a GPU).
    decode_graphs: str = "auto"
    # Pure-decode steps of Llama-family bf16 models on AVX512-BF16 CPUs run one native call per
    # layer (worker/cpu_fused_decode.py).
    cpu_fused_decode: bool = True
    # Record (step shape, wall time) for every step; the planner calibrates from this trace.
    record_step_trace: bool = False
    # Speculative decoding (tokenmill/spec): a SpeculativeConfig, its JSON text or dict as vLLM
    # spells it ({"method": "ngram", "num_speculative_tokens": 4}), or None for none.
    speculative_config: object | None = None

    def __post_init__(self) -> None:
        from tokenmill.spec.config import parse_speculative_config

        spec = parse_speculative_config(self.speculative_config)  # a clear error when malformed
        object.__setattr__(self, "speculative_config", spec)
        if self.decode_graphs not in ("auto", "off", "no-capture"):
            raise ConfigError(
                f"decode_graphs must be auto, off or no-capture, got {self.decode_graphs!r}"
            )
