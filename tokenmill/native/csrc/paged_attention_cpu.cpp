// The entry point of decode attention over the paged KV cache (paged_attention.h explains the
// kernel): checks the tensors and hands their pointers to the per-dtype instantiation.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include "kernels.h"
#include "paged_attention.h"

namespace tokenmill {

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                  const at::Tensor& seq_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B, H, D], cache [NB, BS, Hkv, D]");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "contiguous inputs expected");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "cache dtype must equal q dtype");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "int64 block_table and seq_lens expected");
  TORCH_CHECK(q.size(2) % 16 == 0 && q.size(2) <= attention::kMaxDim,
              "head_dim must be 16k and <= 256");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of KV heads");
  at::Tensor out = at::empty_like(q);
  const at::Tensor table = block_table.contiguous(), lens = seq_lens.contiguous();
  const attention::DecodeProblem problem{
      q.size(0), q.size(1), k_cache.size(2), k_cache.size(1), q.size(2), k_cache.stride(0),
      table.stride(0), table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
      static_cast<float>(scale), window};
  if (q.scalar_type() == at::kFloat) {
    attention::decode_attention<float>(problem, q.data_ptr<float>(), k_cache.data_ptr<float>(),
                                       v_cache.data_ptr<float>(), out.data_ptr<float>());
  } else if (q.scalar_type() == at::kBFloat16) {
    using bf16 = c10::BFloat16;
    attention::decode_attention<bf16>(problem, q.data_ptr<bf16>(), k_cache.data_ptr<bf16>(),
                                      v_cache.data_ptr<bf16>(), out.data_ptr<bf16>());
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16");
  }
  return out;
}

}  // namespace tokenmill
