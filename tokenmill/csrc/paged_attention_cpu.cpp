// Decode attention over the paged KV cache on the CPU, reading each request's K/V blocks in
// place (no gather copy, no padding to the longest request).
//
// One task per (request, KV head): the G query heads sharing that KV head are scored together
// while K is streamed once (pass 1), the scores are exponentiated 16 at a time (a vectorised
// exp: a scalar exp per score costs more than all the memory traffic), then V is streamed once
// for the weighted sum (pass 2). Tasks run on ATen's thread pool.
//
//   q            [B, H, D]            float32 or bfloat16, D a multiple of 16
//   k/v cache    [NB, BS, Hkv, D]     same dtype as q
//   block_table  [B, MB] int64        seq_lens [B] int64
//   out          [B, H, D]            dtype of q

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "kernels.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>


namespace {

#if TOKENMILL_AVX512
using tokenmill::exp16;
using tokenmill::load16;
#endif

constexpr int64_t kMaxDim = 256;

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}


template <typename T>
inline const T* slot(const T* cache, const int64_t* blocks, int64_t pos, int64_t block_size,
                     int64_t block_stride, int64_t slot_stride, int64_t head_offset) {
  return cache + blocks[pos / block_size] * block_stride + (pos % block_size) * slot_stride +
         head_offset;
}

// Scores of `groups` query rows (already scaled) against positions [first, first + n).
template <typename T>
void score_pass(const float* qf, int64_t groups, int64_t dim, const T* k_ptr,
                const int64_t* blocks, int64_t first, int64_t n, int64_t block_size,
                int64_t block_stride, int64_t slot_stride, int64_t head_offset, float* scores) {
  for (int64_t i = 0; i < n; ++i) {
    const T* k = slot(k_ptr, blocks, first + i, block_size, block_stride, slot_stride, head_offset);
#if TOKENMILL_AVX512
    __m512 kv[kMaxDim / 16];
    for (int64_t c = 0; c < dim / 16; ++c) kv[c] = load16(k + c * 16);
    for (int64_t h = 0; h < groups; ++h) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < dim / 16; ++c)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + h * dim + c * 16), kv[c], acc);
      scores[h * n + i] = _mm512_reduce_add_ps(acc);
    }
#else
    for (int64_t h = 0; h < groups; ++h) {
      float acc = 0.f;
      for (int64_t d = 0; d < dim; ++d) acc += qf[h * dim + d] * to_float(k[d]);
      scores[h * n + i] = acc;
    }
#endif
  }
}

// In place: scores -> exp(scores - max); returns their sum.
inline float softmax_numerators(float* s, int64_t n) {
  const float m = *std::max_element(s, s + n);
  float sum = 0.f;
  int64_t i = 0;
#if TOKENMILL_AVX512
  __m512 vsum = _mm512_setzero_ps();
  const __m512 vm = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16) {
    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), vm));
    _mm512_storeu_ps(s + i, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  sum = _mm512_reduce_add_ps(vsum);
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    sum += s[i];
  }
  return sum;
}

template <typename T>
void value_pass(const float* p, int64_t groups, int64_t dim, const T* v_ptr,
                const int64_t* blocks, int64_t first, int64_t n, int64_t block_size,
                int64_t block_stride, int64_t slot_stride, int64_t head_offset, float* acc) {
  std::fill(acc, acc + groups * dim, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    const T* v = slot(v_ptr, blocks, first + i, block_size, block_stride, slot_stride, head_offset);
#if TOKENMILL_AVX512
    for (int64_t c = 0; c < dim / 16; ++c) {
      const __m512 vv = load16(v + c * 16);
      for (int64_t h = 0; h < groups; ++h) {
        float* a = acc + h * dim + c * 16;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(p[h * n + i]), vv, _mm512_loadu_ps(a)));
      }
    }
#else
    for (int64_t h = 0; h < groups; ++h)
      for (int64_t d = 0; d < dim; ++d) acc[h * dim + d] += p[h * n + i] * to_float(v[d]);
#endif
  }
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
      scores.resize(groups * n);
      score_pass(qf.data(), groups, dim, k_ptr, blocks, first, n, block_size, block_stride,
                 slot_stride, g * dim, scores.data());
      std::vector<float> inv_sum(groups);
      for (int64_t h = 0; h < groups; ++h) inv_sum[h] = 1.f / softmax_numerators(&scores[h * n], n);
      value_pass(scores.data(), groups, dim, v_ptr, blocks, first, n, block_size, block_stride,
                 slot_stride, g * dim, acc.data());
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
  TORCH_CHECK(q.size(2) % 16 == 0 && q.size(2) <= kMaxDim, "head_dim must be 16k and <= 256");
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
