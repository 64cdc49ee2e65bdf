"""Llama-family bf16 models on the CPU, one or two native calls per layer.

At batch 1 an eager decoder layer is ~25 PyTorch operator calls whose dispatch overhead is a
third of the step; tokenmill/native/csrc/llama_decode_cpu.cpp runs the whole layer (norms, packed
GEMMs — bf16 or quantized weights —, rotary, K/V write, paged attention, SiLU*up, residuals) in
one call, over a bf16 KV cache or an int8 / fp8 one (attention/kv_quant.py: the new K/V are
quantized into their slots, attention reads the 1-byte values in place). A step that carries a
prompt chunk runs the layer's two native halves around the attention backend's own math (SDPA
for the chunks, the paged kernel for the decode rows), so its prompt tokens are attended exactly
as in the eager model while the decodes beside them no longer pay eager dispatch (SmolLM2 GGUF,
24 decodes and a 1-token chunk: 55 -> 48 ms a step; with a 256-token chunk 255 -> 208 ms;
BENCHMARKS 11). Like the CUDA graphs of cuda_graphs.py, this is a runner concern: the model
file keeps the math.
"""

from __future__ import annotations

import torch

from tokenmill.models.linear_ops import PackedWeight, compute_weight, packed_weight
from tokenmill.quant.packing import QuantizedWeight
from tokenmill.worker.input_batch import StepInputs

# Tokens per request the fused layer takes in one step; each is a row of the GEMMs and attends
# on its own, so past a few tokens the eager path's prompt attention is the better one.
MAX_QUERY_LEN = 16


def fused_decode_for(model: torch.nn.Module, dtype: torch.dtype, device: torch.device):
    """A FusedCpuDecode for this model, or None when it does not apply."""
    from tokenmill.models.llama import LlamaForCausalLM
    from tokenmill.native import kernels as native_kernels

    arch = getattr(model, "arch", None)
    if not isinstance(model, LlamaForCausalLM) or device.type != "cpu" or dtype != torch.bfloat16:
        return None
    if arch.attention_bias or arch.mlp_bias or arch.architecture == "qwen2" or arch.sliding_window:
        return None
    if arch.head_dim % 16 or arch.head_dim > 256 or arch.hidden_act != "silu":
        return None
    kernels = native_kernels()
    if kernels is None or not kernels.has_avx512_bf16():
        return None
    return FusedCpuDecode(model, kernels)


class FusedCpuDecode:
    def __init__(self, model: torch.nn.Module, kernels) -> None:
        self.model = model
        self.kernels = kernels
        self.arch = model.arch
        self._layers = []
        self._specs = [layer.self_attn.attn.spec for layer in model.model.layers]
        # The backend that attends a step with prompt chunks between the layer's halves.
        backend = model.model.layers[0].self_attn.attn.backend
        self._attention = backend if hasattr(backend, "attend") else None
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            weights, layouts = zip(*(self._weight(compute_weight(m)) for m in linears), strict=True)
            self._layers.append(
                (
                    layer.input_layernorm.weight,
                    layer.post_attention_layernorm.weight,
                    list(weights),
                    [field for layout in layouts for field in layout],
                    attn.attn.spec.scale,
                )
            )

    def _weight(self, weight) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(packed tensor, layout) as llama_decode_layer takes a weight: bf16 panels, or the
        integer blocks of a quantized one (bits, has_min, group, out_features, act_bits)."""
        if isinstance(weight, QuantizedWeight):
            w = weight
            return w.packed, (w.bits, int(w.has_min), w.group, w.out_features, w.act_bits)
        if isinstance(weight, PackedWeight):
            return weight.packed, (16, 0, 0, weight.out_features, 0)
        bf16 = packed_weight(self.kernels.pack_bf16_weight, weight)
        return bf16, (16, 0, 0, weight.shape[0], 0)

    def can_run(self, inputs: StepInputs) -> bool:
        """Any step whose attention the backend can take between the layer's halves; without
        such a backend, steps of a few tokens per request and no prompt: decodes, drafts being
        verified, a draft model catching up on the tokens the target accepted."""
        return self._attention is not None or _rows_only(inputs)

    @torch.inference_mode()
    def run(
        self,
        inputs: StepInputs,
        kv_caches: list[torch.Tensor],
        kv_scale_caches: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, E] of a step: decodes (with drafts) as rows of the one-call layer,
        anything with a prompt chunk through the layer's halves; per layer kv_caches [2, NB,
        BS, Hkv, D] (bf16, or int8 / fp8 with kv_scale_caches [2, NB, Hkv, BS])."""
        inner = self.model.model
        x = inner.embed_tokens(inputs.input_ids).contiguous()  # (T, E)
        cos = inner.rotary_emb.cos_cache[inputs.positions].contiguous()  # (T, D) fp32
        sin = inner.rotary_emb.sin_cache[inputs.positions].contiguous()
        if _rows_only(inputs):
            self._run_rows(inputs, x, cos, sin, kv_caches, kv_scale_caches)
        else:
            self._run_split(inputs, x, cos, sin, kv_caches, kv_scale_caches)
        return inner.norm(x)

    def _run_rows(self, inputs: StepInputs, x, cos, sin, kv_caches, kv_scale_caches) -> None:
        """Every token a row of the native paged attention, inside the one-call layer."""
        arch = self.arch
        md = inputs.metadata
        block_table, seq_lens = md.block_table, md.seq_lens
        if md.num_tokens != md.num_reqs:
            # Drafts: each token is a row of its own that sees its request's keys up to itself
            # (all of the step's K/V are written before any attention reads).
            q_lens = md.query_start_loc[1:] - md.query_start_loc[:-1]
            block_table = block_table.repeat_interleave(q_lens, dim=0)
            seq_lens = inputs.positions + 1
        for i, (norm1, norm2, weights, layouts, scale) in enumerate(self._layers):
            self.kernels.llama_decode_layer(
                x, norm1, norm2, arch.rms_norm_eps, weights, layouts, cos, sin,
                kv_caches[i], md.slot_mapping, block_table, seq_lens,
                arch.num_attention_heads, arch.num_key_value_heads, scale,
                kv_scale_caches[i] if kv_scale_caches is not None else None,
            )  # fmt: skip

    def _run_split(self, inputs: StepInputs, x, cos, sin, kv_caches, kv_scale_caches) -> None:
        """The layer's native halves around the backend's attention (prompt chunks by SDPA,
        decode rows by the paged kernel), the step's K/V stored by the first half."""
        arch = self.arch
        md = inputs.metadata
        tokens, heads, kv_heads = x.shape[0], arch.num_attention_heads, arch.num_key_value_heads
        dim = arch.head_dim
        q_size, kv_size = heads * dim, kv_heads * dim
        for i, (norm1, norm2, weights, layouts, _) in enumerate(self._layers):
            scales = kv_scale_caches[i] if kv_scale_caches is not None else None
            qkv = self.kernels.llama_layer_qkv(
                x, norm1, arch.rms_norm_eps, weights, layouts, cos, sin, kv_caches[i],
                md.slot_mapping, heads, kv_heads, scales,
            )  # fmt: skip
            q = qkv[:, :q_size].view(tokens, heads, dim)
            k = qkv[:, q_size : q_size + kv_size].view(tokens, kv_heads, dim)
            v = qkv[:, q_size + kv_size :].view(tokens, kv_heads, dim)
            attn = self._attention.attend(self._specs[i], q, k, v, kv_caches[i], md, scales)
            out = attn.reshape(tokens, q_size).contiguous()
            self.kernels.llama_layer_out(x, out, norm2, arch.rms_norm_eps, weights, layouts)


def _rows_only(inputs: StepInputs) -> bool:
    return not inputs.has_prompt_tokens and inputs.max_query_len <= MAX_QUERY_LEN
