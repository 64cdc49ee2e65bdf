// The native CPU kernels of tokenmill; bindings.cpp exposes them to Python. Kernel files
// include ATen's core headers only (torch/extension.h alone takes ~20 s to compile).
#pragma once

#include <ATen/core/Tensor.h>

namespace tokenmill {

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                  const at::Tensor& seq_lens, double scale, int64_t window);

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

at::Tensor argmax_last_dim(const at::Tensor& logits);

at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& w, double eps);

void llama_decode_layer(at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& post_norm,
                        double eps, const at::Tensor& qkv_packed, const at::Tensor& o_packed,
                        const at::Tensor& gate_up_packed, const at::Tensor& down_packed,
                        const at::Tensor& cos, const at::Tensor& sin, at::Tensor& kv_cache,
                        const at::Tensor& slot_mapping, const at::Tensor& block_table,
                        const at::Tensor& seq_lens, int64_t num_heads, int64_t num_kv_heads,
                        double scale);

}  // namespace tokenmill
