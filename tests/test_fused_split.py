"""Steps that carry prompt chunks on the fused CPU layer (worker/cpu_fused_decode.py): the
layer's two native halves around the attention backend, on the bundled model in bf16. They run
every step of a chunked, mixed batch (the eager model is never called) and compute what the
eager layers compute."""

from __future__ import annotations

import dataclasses

from tests.test_fused_kv_quant import logprob_errors
from tokenmill import LLM, SamplingParams
from tokenmill.engine.build import engine_sharing_weights


def engine_like(base: LLM, fused: bool, budget: int) -> LLM:
    cfg = base.engine.config
    cfg = dataclasses.replace(
        cfg,
        scheduler=dataclasses.replace(cfg.scheduler, max_num_batched_tokens=budget),
        cpu_fused_decode=fused,
    )
    return LLM.from_engine(engine_sharing_weights(base.engine, cfg))


class _Counting:
    """The native module, counting the calls of each function the fused layer makes."""

    def __init__(self, kernels) -> None:
        self._kernels = kernels
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        fn = getattr(self._kernels, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted


def test_mixed_chunked_steps_run_fused_and_match_eager(fused_bf16, sharegpt_prompts):
    tokenizer = fused_bf16.get_tokenizer()
    prompts = [tokenizer.encode(p)[:150] for p in sharegpt_prompts[:12]]
    # A 64-token budget: prompts are chunked, and most steps carry chunks beside decodes.
    fused, eager = (engine_like(fused_bf16, f, 64) for f in (1, 0))
    layer = fused.engine.runner.fused_decode
    counting = _Counting(layer.kernels)
    layer.kernels = counting
    eager_calls = []  # the model object is shared: watch it only while the fused engine runs
    hook = fused.engine.runner.model.register_forward_pre_hook(lambda *_: eager_calls.append(1))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=20)
    runs = [fused.generate(prompts, params, use_tqdm=False)]
    hook.remove()
    runs.append(eager.generate(prompts, params, use_tqdm=False))

    layers = len(layer._layers)
    assert not eager_calls
    assert counting.calls["llama_layer_qkv"] == counting.calls["llama_layer_out"]
    assert counting.calls["llama_layer_qkv"] >= 10 * layers  # >= 10 steps with prompt tokens
    assert counting.calls.get("llama_decode_layer", 0) >= layers  # decode-only steps too
    for a, b in zip(*runs, strict=True):
        assert a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0]
    errors = logprob_errors(*runs)
    assert len(errors) >= 100
    assert sum(errors) / len(errors) < 0.15, sum(errors) / len(errors)
