// The entry points of decode attention over the paged KV cache (paged_attention.h explains the
// kernel) and of the quantized KV write: they check the tensors and hand their pointers to the
// per-dtype instantiations.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include "kernels.h"
#include "paged_attention.h"
#include "paged_attention_kv_quant.h"

namespace tokenmill {

namespace {

attention::DecodeProblem decode_problem(const at::Tensor& q, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, const at::Tensor& table,
                                        const at::Tensor& lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B, H, D], cache [NB, BS, Hkv, D]");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "contiguous inputs expected");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && k_cache.size(3) == q.size(2),
              "K and V caches of one shape, head_dim of q");
  TORCH_CHECK(table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
              "int64 block_table and seq_lens expected");
  TORCH_CHECK(table.is_contiguous() && lens.is_contiguous(), "contiguous block_table, seq_lens");
  TORCH_CHECK(q.size(2) % 16 == 0 && q.size(2) <= attention::kMaxDim,
              "head_dim must be 16k and <= 256");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of KV heads");
  return {q.size(0), q.size(1), k_cache.size(2), k_cache.size(1), q.size(2), k_cache.stride(0),
          table.stride(0), table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
          static_cast<float>(scale), window};
}

template <typename Q, typename C>
void run_decode(const attention::DecodeProblem& problem, const at::Tensor& q,
                const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor& out) {
  attention::decode_attention<Q, C>(problem, q.data_ptr<Q>(), k_cache.data_ptr<C>(),
                                    v_cache.data_ptr<C>(), out.data_ptr<Q>());
}

template <typename C>
void run_quantized_decode(const attention::DecodeProblem& problem, const at::Tensor& q,
                          const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor& out) {
  if (q.scalar_type() == at::kFloat) return run_decode<float, C>(problem, q, k_cache, v_cache, out);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "float32 or bfloat16 q expected");
  run_decode<c10::BFloat16, C>(problem, q, k_cache, v_cache, out);
}

void check_scales(const at::Tensor& scales, const at::Tensor& cache) {
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(),
              "contiguous bfloat16 scales expected");
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == cache.size(0) &&
                  scales.size(1) == cache.size(2) && scales.size(2) == cache.size(1),
              "scales [NB, Hkv, BS] of the cache [NB, BS, Hkv, D]");
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                  const at::Tensor& seq_lens, double scale, int64_t window) {
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "cache dtype must equal q dtype");
  const at::Tensor table = block_table.contiguous(), lens = seq_lens.contiguous();
  const auto problem = decode_problem(q, k_cache, v_cache, table, lens, scale, window);
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    run_decode<float, float>(problem, q, k_cache, v_cache, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    run_decode<c10::BFloat16, c10::BFloat16>(problem, q, k_cache, v_cache, out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16");
  }
  return out;
}

at::Tensor paged_decode_attention_quant(const at::Tensor& q, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache, const at::Tensor& k_scales,
                                        const at::Tensor& v_scales, const at::Tensor& block_table,
                                        const at::Tensor& seq_lens, double scale,
                                        int64_t window) {
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == dtype, "K and V caches of one dtype");
  check_scales(k_scales, k_cache);
  check_scales(v_scales, v_cache);
  const at::Tensor table = block_table.contiguous(), lens = seq_lens.contiguous();
  auto problem = decode_problem(q, k_cache, v_cache, table, lens, scale, window);
  problem.k_scales = k_scales.data_ptr<c10::BFloat16>();
  problem.v_scales = v_scales.data_ptr<c10::BFloat16>();
  at::Tensor out = at::empty_like(q);
  if (dtype == at::kChar) {
    run_quantized_decode<int8_t>(problem, q, k_cache, v_cache, out);
  } else {
    TORCH_CHECK(dtype == at::kFloat8_e4m3fn, "int8 or float8_e4m3fn caches expected");
    run_quantized_decode<attention::Fp8>(problem, q, k_cache, v_cache, out);
  }
  return out;
}

namespace {

template <typename T, typename C>
void write_slots(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                 at::Tensor& v_cache, at::Tensor& k_scales, at::Tensor& v_scales,
                 const int64_t* slots) {
  const int64_t heads = k.size(1), dim = k.size(2), block_size = k_cache.size(1);
  const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  C *kc = k_cache.data_ptr<C>(), *vc = v_cache.data_ptr<C>();
  c10::BFloat16 *ks = k_scales.data_ptr<c10::BFloat16>(), *vs = v_scales.data_ptr<c10::BFloat16>();
  at::parallel_for(0, k.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      attention::store_token(kp + t * heads * dim, vp + t * heads * dim, heads, dim, block_size,
                             slots[t], kc, vc, ks, vs);
  });
}

template <typename C>
void write_quantized(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                     at::Tensor& v_cache, at::Tensor& k_scales, at::Tensor& v_scales,
                     const int64_t* slots) {
  if (k.scalar_type() == at::kFloat)
    return write_slots<float, C>(k, v, k_cache, v_cache, k_scales, v_scales, slots);
  TORCH_CHECK(k.scalar_type() == at::kBFloat16, "float32 or bfloat16 K/V expected");
  write_slots<c10::BFloat16, C>(k, v, k_cache, v_cache, k_scales, v_scales, slots);
}

void check_write(const at::Tensor& x, const at::Tensor& cache, const at::Tensor& scales,
                 const at::Tensor& slot_mapping) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "contiguous K/V [T, Hkv, D] expected");
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 4 && cache.size(2) == x.size(1) &&
                  cache.size(3) == x.size(2),
              "a contiguous cache [NB, BS, Hkv, D] of K/V's heads and head_dim");
  check_scales(scales, cache);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == x.size(0),
              "a contiguous int64 slot per token expected");
}

}  // namespace

void write_kv_quant(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                    at::Tensor& v_cache, at::Tensor& k_scales, at::Tensor& v_scales,
                    const at::Tensor& slot_mapping) {
  check_write(k, k_cache, k_scales, slot_mapping);
  check_write(v, v_cache, v_scales, slot_mapping);
  TORCH_CHECK(v.scalar_type() == k.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "K and V of one dtype, their caches too");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < k.size(0); ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot out of range");
  if (k_cache.scalar_type() == at::kChar)
    return write_quantized<int8_t>(k, v, k_cache, v_cache, k_scales, v_scales, slots);
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat8_e4m3fn, "int8 or float8_e4m3fn cache expected");
  write_quantized<attention::Fp8>(k, v, k_cache, v_cache, k_scales, v_scales, slots);
}

}  // namespace tokenmill
