// The two passes of decode attention over a task's cache chunks in portable C++: any
// instruction set, any head_dim (a multiple of 16). Sums run in kLanes independent lanes, so
// the compiler vectorises them (AVX2, NEON) without reordering a sum. The AVX-512 variant
// also takes this path for head_dims it has no specialised passes for (D16 == 0: the head_dim
// is read at run time).
#pragma once

#include <algorithm>

#include "paged_attention.h"

namespace tokenmill::attention::portable {

template <typename T>
inline float dot(const T* a, const T* b, int64_t dim) {
  float lanes[kLanes] = {};
  for (int64_t d = 0; d < dim; d += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += to_float(a[d + l]) * to_float(b[d + l]);
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// scores[h * n + i] = scale * q_h . k_i for every query head h of the request.
template <typename T, int D16>
void score_pass(const T* q, int64_t num_kv_heads, int64_t groups, float scale,
                const Span<T>& span, float* scores) {
  const int64_t n_total = span.end - span.first;
  const int64_t dim = D16 > 0 ? kLanes * D16 : span.dim;
  const int64_t num_heads = num_kv_heads * groups;
  span.for_chunks(span.k, [&](int64_t i0, int64_t offset, int64_t n, const Lookahead& ahead) {
    for (int64_t h = 0; h < num_heads; ++h) {
      if (ahead.p) ahead.fetch(h, num_heads);
      const T* k = span.k + offset + (h / groups) * dim;
      for (int64_t i = 0; i < n; ++i)
        scores[h * n_total + i0 + i] = dot(q + h * dim, k + i * span.slot_stride, dim) * scale;
    }
  }, span.lines_of_chunk(span.v, span.first));
}

// acc[h][:] = sum_i p[h * n + i] * v_i for every query head, chunk by chunk as for K.
template <typename T, int D16>
void value_pass(const float* probs, int64_t num_kv_heads, int64_t groups, const Span<T>& span,
                float* acc, const Lookahead& after) {
  const int64_t n_total = span.end - span.first;
  const int64_t dim = D16 > 0 ? kLanes * D16 : span.dim;
  std::fill(acc, acc + num_kv_heads * groups * dim, 0.f);
  span.for_chunks(span.v, [&](int64_t i0, int64_t offset, int64_t n, const Lookahead& ahead) {
    for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
      if (ahead.p) ahead.fetch(kvh, num_kv_heads);
      for (int64_t h = kvh * groups; h < (kvh + 1) * groups; ++h) {
        float* a = acc + h * dim;
        for (int64_t i = 0; i < n; ++i) {
          const float p = probs[h * n_total + i0 + i];
          const T* v = span.v + offset + i * span.slot_stride + kvh * dim;
          for (int64_t d = 0; d < dim; ++d) a[d] += p * to_float(v[d]);
        }
      }
    }
  }, after);
}

}  // namespace tokenmill::attention::portable
