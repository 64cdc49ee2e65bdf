// Decode attention over the paged KV cache on the CPU, reading each request's K/V blocks in
// place (no gather copy, no padding to the longest request).
//
// One task per (request, KV head): the G query heads sharing that KV head are scored together
// while K is streamed once, then V is streamed once for the weighted sum. Scores stay in a
// per-task buffer (two-pass softmax). Tasks run on ATen's thread pool.
//
//   q            [B, H, D]            float32 or bfloat16
//   k/v cache    [NB, BS, Hkv, D]     same dtype as q
//   block_table  [B, MB] int64        seq_lens [B] int64
//   out          [B, H, D]            dtype of q

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline float dot(const float* q, const T* k, int64_t dim) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < dim; ++d) acc += q[d] * to_float(k[d]);
  return acc;
}

template <typename T>
inline void axpy(float* acc, float p, const T* v, int64_t dim) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) acc[d] += p * to_float(v[d]);
}

template <typename T>
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                      int64_t window, at::Tensor& out) {
  const int64_t num_reqs = q.size(0), num_heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t groups = num_heads / num_kv_heads;
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t table_stride = block_table.stride(0);
  const int64_t slot_stride = num_kv_heads * dim;  // one token's K (or V) of all KV heads
  const int64_t block_stride = k_cache.stride(0);

  at::parallel_for(0, num_reqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(groups * dim), acc(groups * dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, g = task % num_kv_heads;
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      const int64_t* blocks = table + b * table_stride;
      for (int64_t h = 0; h < groups; ++h) {
        const T* src = q_ptr + (b * num_heads + g * groups + h) * dim;
        for (int64_t d = 0; d < dim; ++d) qf[h * dim + d] = to_float(src[d]) * float(scale);
      }
      scores.assign(groups * n, 0.f);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t pos = first + i;
        const T* k = k_ptr + blocks[pos / block_size] * block_stride +
                     (pos % block_size) * slot_stride + g * dim;
        for (int64_t h = 0; h < groups; ++h) scores[h * n + i] = dot(&qf[h * dim], k, dim);
      }
      std::vector<float> inv_sum(groups);
      for (int64_t h = 0; h < groups; ++h) {
        float* s = &scores[h * n];
        const float m = *std::max_element(s, s + n);
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          s[i] = std::exp(s[i] - m);
          sum += s[i];
        }
        inv_sum[h] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t pos = first + i;
        const T* v = v_ptr + blocks[pos / block_size] * block_stride +
                     (pos % block_size) * slot_stride + g * dim;
        for (int64_t h = 0; h < groups; ++h) axpy(&acc[h * dim], scores[h * n + i], v, dim);
      }
      for (int64_t h = 0; h < groups; ++h) {
        T* dst = out_ptr + (b * num_heads + g * groups + h) * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(acc[h * dim + d] * inv_sum[h]);
      }
    }
  });
}

}  // namespace

namespace tokenmill {

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                  const at::Tensor& seq_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B, H, D], cache [NB, BS, Hkv, D]");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "contiguous inputs expected");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type(), "cache dtype must equal q dtype");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "int64 block_table and seq_lens expected");
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    decode_attention<float>(q, k_cache, v_cache, block_table, seq_lens, scale, window, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    decode_attention<c10::BFloat16>(q, k_cache, v_cache, block_table, seq_lens, scale, window,
                                    out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16");
  }
  return out;
}

}  // namespace tokenmill
