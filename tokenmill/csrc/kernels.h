// The native CPU kernels of tokenmill; bindings.cpp exposes them to Python.
#pragma once

#include <torch/extension.h>

namespace tokenmill {

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                  const at::Tensor& seq_lens, double scale, int64_t window);

bool has_avx512_bf16();

at::Tensor pack_bf16_weight(const at::Tensor& w);
at::Tensor gemm_bf16_packed(const at::Tensor& x, const at::Tensor& packed);

}  // namespace tokenmill
