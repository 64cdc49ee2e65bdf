"""Engine options shared by the sub-commands that run a model (generate, chat, serve, bench)."""

from __future__ import annotations

import argparse

from tokenmill.config import (
    KV_CACHE_DTYPES,
    SLO_POLICIES,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)


def add_engine_args(parser: argparse.ArgumentParser, positional_model: bool = True) -> None:
    if positional_model:
        parser.add_argument(
            "model", nargs="?", default=None,
            help="a GGUF file or a Hugging Face folder (default: the bundled SmolLM2-135M-Instruct)",
        )  # fmt: skip
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CPUs with native bf16 (AVX512-BF16/AMX), else float32; on a GPU "
        "the checkpoint's own dtype",
    )
    group.add_argument("--load-format", default="auto", choices=["auto", "gguf", "hf", "dummy"])
    group.add_argument(
        "--quantization", "-q", default="none", metavar="SCHEME",
        help="weights computed as: none (dequantized to --dtype), gguf (the GGUF file's own "
        "blocks), int8[-gN], int4[-gN][-sym] (N = 32, 64, 128), or auto (gguf for a quantized "
        "GGUF where the native integer kernels run, else none); -a16 after an integer scheme "
        "(gguf-a16, int8-a16): activations in two int8 passes, near float accuracy",
    )  # fmt: skip
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--max-num-seqs", type=int, default=64)
    group.add_argument("--max-num-batched-tokens", type=int, default=512)
    group.add_argument(
        "--long-prefill-token-threshold", type=int, default=None, metavar="N",
        help="while requests wait, a running prompt's chunk is at most N tokens (default: half "
        "of --max-num-batched-tokens; 0: no cap)",
    )  # fmt: skip
    group.add_argument("--kv-cache-memory", type=float, default=1.0, help="GiB for the KV cache")
    group.add_argument(
        "--kv-cache-dtype", default="auto", choices=["auto", *KV_CACHE_DTYPES],
        help="auto: the model's dtype; int8 or fp8 (= fp8_e4m3): quantized with a scale per "
        "(token, KV head), about twice the blocks in the same memory",
    )  # fmt: skip
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--no-prefix-caching", action="store_true")
    group.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    _add_slo_args(group)
    group.add_argument(
        "--speculative-config", default=None, metavar="JSON",
        help="speculative decoding, as vLLM spells it: '{\"method\": \"ngram\" | \"draft\" | "
        "\"self\", \"num_speculative_tokens\": k | \"auto\"}' (ngram: prompt_lookup_min/max; "
        "draft: model; self: quantization of the target's own weights as the draft)",
    )  # fmt: skip
    group.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    group.add_argument("--device", default="cpu")
    group.add_argument("--seed", type=int, default=0)


def _add_slo_args(group) -> None:
    group.add_argument(
        "--slo", default=None, metavar="TARGETS",
        help="default latency targets of requests that set none (their body's \"slo\": "
        "{\"ttft_ms\", \"tpot_ms\"}), e.g. ttft=2s,tpot=100ms",
    )  # fmt: skip
    group.add_argument(
        "--slo-policy", default=None, choices=SLO_POLICIES,
        help="a request the step-time predictor says cannot meet its SLO is refused at once "
        "(reject: 429 + Retry-After), waits while its TTFT still can be met (queue), or is "
        "served without a promise (best-effort); off: FCFS. Default: reject with --slo, else off",
    )  # fmt: skip
    group.add_argument(
        "--slo-tpot-share", type=float, default=0.85, metavar="F",
        help="steps are planned to this share of the tightest promised TPOT, leaving the rest "
        "for step-time noise (default 0.85; 1.0: to the promise exactly)",
    )  # fmt: skip
    group.add_argument(
        "--slo-ttft-share", type=float, default=0.9, metavar="F",
        help="prompts are planned to finish by this share of their TTFT, leaving the rest for "
        "steps that run over their prediction (default 0.9; 1.0: to the promise exactly)",
    )  # fmt: skip
    group.add_argument(
        "--slo-max-jitter", type=float, default=None, metavar="R",
        help="bounded jitter: a promised request's stream is handed out no faster than its "
        "planned TPOT / R per token (the engine still computes at full speed), so promised "
        "TPOTs lie within a factor R (e.g. 1.5: TPOT p99/p50 within 1.5; default: no pacing)",
    )  # fmt: skip


def engine_config_from_args(args: argparse.Namespace, **scheduler_overrides) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(
            model=getattr(args, "model", None), dtype=args.dtype, load_format=args.load_format,
            max_model_len=args.max_model_len, seed=args.seed, device=args.device,
            quantization=args.quantization,
        ),
        cache=CacheConfig(
            block_size=args.block_size, kv_cache_memory_gib=args.kv_cache_memory,
            enable_prefix_caching=not args.no_prefix_caching, kv_cache_dtype=args.kv_cache_dtype,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            policy=args.scheduling_policy, slo=getattr(args, "slo", None),
            slo_policy=_slo_policy(args),
            slo_tpot_share=getattr(args, "slo_tpot_share", SchedulerConfig.slo_tpot_share),
            slo_ttft_share=getattr(args, "slo_ttft_share", SchedulerConfig.slo_ttft_share),
            slo_max_jitter=getattr(args, "slo_max_jitter", None),
            long_prefill_token_threshold=getattr(args, "long_prefill_token_threshold", None),
            **scheduler_overrides,
        ),
        attention_backend=args.attention_backend,
        speculative_config=getattr(args, "speculative_config", None),
    )  # fmt: skip


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=max_tokens)
    group.add_argument("--temperature", type=float, default=0.7)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    group.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def sampling_params_from_args(args: argparse.Namespace, **overrides):
    from tokenmill.sampling_params import SamplingParams

    values = dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.sample_seed, stop=tuple(args.stop),
    )  # fmt: skip
    values.update(overrides)
    return SamplingParams(**values)


def _slo_policy(args: argparse.Namespace) -> str:
    policy = getattr(args, "slo_policy", None)
    if policy is None:
        return "reject" if getattr(args, "slo", None) else "off"
    return policy
