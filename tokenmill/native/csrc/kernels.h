// The native CPU kernels of tokenmill; bindings.cpp exposes them to Python. Kernel files
// include ATen's core headers only (torch/extension.h alone takes ~20 s to compile).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace tokenmill {

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                  const at::Tensor& seq_lens, double scale, int64_t window);
// The same over an int8 or float8_e4m3fn cache with bf16 scales [NB, BS, Hkv] per (slot, KV
// head): x = scale * value (paged_attention_quant.h).
at::Tensor paged_decode_attention_quant(const at::Tensor& q, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, const at::Tensor& k_scales,
                                        const at::Tensor& v_scales, const at::Tensor& block_table,
                                        const at::Tensor& seq_lens, double scale, int64_t window);
// k, v [T, Hkv, D] quantized into their slots of such a cache (paged_attention_kv_quant.h).
void write_kv_quant(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                    at::Tensor& v_cache, at::Tensor& k_scales, at::Tensor& v_scales,
                    const at::Tensor& slot_mapping);

// Whether the AVX512-BF16 GEMM is compiled in (else a portable loop computes the same).
bool has_avx512_bf16();

at::Tensor pack_bf16_weight(const at::Tensor& w);
at::Tensor gemm_bf16_packed(const at::Tensor& x, const at::Tensor& packed);
// argmax over each row of x @ W^T (bf16 values, first of equals), without the [M, N] product.
at::Tensor gemm_bf16_argmax(const at::Tensor& x, const at::Tensor& packed);

// Whether the AVX-512 fp32 GEMM (and the AVX-512 paths of the other kernels) is compiled in.
bool has_avx512f();
at::Tensor pack_f32_weight(const at::Tensor& w);
at::Tensor gemm_f32_packed(const at::Tensor& x, const at::Tensor& packed);

// Whether the AVX512-VNNI quantized GEMM is compiled in (else a portable loop, same sums).
bool has_avx512_vnni();
// x [M, K] @ W^T for a weight packed by tokenmill/quant/packing.py (4- or 8-bit integers, a
// scale and optionally a min per group of `group` k); y [M, n_dim] in x's dtype. act_bits 8:
// x rounded to int8 per block of 32; 16: and its remainder too (two integer passes).
at::Tensor quant_gemm(const at::Tensor& x, const at::Tensor& packed, int64_t bits, bool has_min,
                      int64_t group, int64_t n_dim, int64_t act_bits = 8);

at::Tensor argmax_last_dim(const at::Tensor& logits);
// argmax_last_dim where rows[j] may only pick the tokens bitmask row allowed[j] ([M, W] int32)
// sets; the other rows are plain argmaxes.
at::Tensor argmax_last_dim_masked(const at::Tensor& logits, const at::Tensor& rows,
                                  const at::Tensor& allowed);

at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& w, double eps);

// weights: qkv, o, gate_up, down, each packed bf16 or quantized; layouts: 4 fields per weight
// (bits: 16 for bf16 or 4/8, has_min, group, out_features). kv_cache bf16, or int8 / fp8 with
// kv_scales [2, NB, Hkv, BS] (paged_attention_kv_quant.h's layout).
void llama_decode_layer(at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& post_norm,
                        double eps, const std::vector<at::Tensor>& weights,
                        const std::vector<int64_t>& layouts,
                        const at::Tensor& cos, const at::Tensor& sin, at::Tensor& kv_cache,
                        const at::Tensor& slot_mapping, const at::Tensor& block_table,
                        const at::Tensor& seq_lens, int64_t num_heads, int64_t num_kv_heads,
                        double scale, const std::optional<at::Tensor>& kv_scales);

// The layer in two halves around attention, for steps whose attention runs elsewhere (prompt
// chunks): the RMSNorm'd QKV product with rotary applied, K/V stored into their slots, returned
// as [T, H*D + 2*Hkv*D]; then x += o_proj(attn) and the MLP block, in place on x.
at::Tensor llama_layer_qkv(at::Tensor& x, const at::Tensor& input_norm, double eps,
                           const std::vector<at::Tensor>& weights,
                           const std::vector<int64_t>& layouts, const at::Tensor& cos,
                           const at::Tensor& sin, at::Tensor& kv_cache,
                           const at::Tensor& slot_mapping, int64_t num_heads,
                           int64_t num_kv_heads, const std::optional<at::Tensor>& kv_scales);
void llama_layer_out(at::Tensor& x, const at::Tensor& attn, const at::Tensor& post_norm,
                     double eps, const std::vector<at::Tensor>& weights,
                     const std::vector<int64_t>& layouts);

}  // namespace tokenmill
