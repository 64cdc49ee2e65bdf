// The two passes of decode attention over a task's cache chunks with AVX-512, for a head_dim
// known at compile time (D16 = head_dim / 16).
//
// Positions go 16 at a time within a cache block (no division per position): the 16 partial
// dot products of a query head are summed across lanes by one transpose-and-add tree, so a
// score costs a few instructions instead of a full horizontal reduction. With AVX512-BF16 the
// bf16 scores use vdpbf16ps on the raw cache (no conversion); the weighted sum of V keeps its
// accumulators in registers (template on head_dim / 16).
#pragma once

#include <algorithm>

#include "paged_attention.h"

#if TOKENMILL_AVX512

namespace tokenmill::attention::avx512 {

// Lane i of the result = sum of all lanes of v[i], for 16 vectors (the rest of v is clobbered).
// Each level adds lane pairs (i, i ^ s) of two vectors and keeps one vector's sums in the lanes
// with bit s clear, the other's in the lanes with bit s set.
template <int S>
inline __m512 fold(__m512 a, __m512 b) {
  constexpr __mmask16 kHigh = S == 8 ? 0xff00 : S == 4 ? 0xf0f0 : S == 2 ? 0xcccc : 0xaaaa;
  const __m512 p = _mm512_mask_blend_ps(kHigh, a, b);
  const __m512 q = _mm512_mask_blend_ps(kHigh, b, a);
  __m512 swapped;
  if constexpr (S == 8) swapped = _mm512_shuffle_f32x4(q, q, 0x4e);
  else if constexpr (S == 4) swapped = _mm512_shuffle_f32x4(q, q, 0xb1);
  else if constexpr (S == 2) swapped = _mm512_permute_ps(q, 0x4e);
  else swapped = _mm512_permute_ps(q, 0xb1);
  return _mm512_add_ps(p, swapped);
}

inline __m512 transpose_sum(__m512* v) {
  for (int j = 0; j < 8; ++j) v[j] = fold<8>(v[j], v[j + 8]);
  for (int j = 0; j < 4; ++j) v[j] = fold<4>(v[j], v[j + 4]);
  for (int j = 0; j < 2; ++j) v[j] = fold<2>(v[j], v[j + 2]);
  return fold<1>(v[0], v[1]);
}

// Per-dtype dot products of one query head with a cache row: 16 lanes of partial sums.
template <typename T, int D16>
struct Query;

template <int D16>
struct Query<float, D16> {
  __m512 q[D16];
  void load(const float* src) {
    for (int c = 0; c < D16; ++c) q[c] = _mm512_loadu_ps(src + 16 * c);
  }
  __m512 dot(const float* k) const {
    __m512 acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(k));
    for (int c = 1; c < D16; ++c) acc = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(k + 16 * c), acc);
    return acc;
  }
};

template <int D16>
struct Query<c10::BFloat16, D16> {
#if defined(__AVX512BF16__)
  static constexpr bool kPairs = D16 % 2 == 0;  // whole 32-element vdpbf16ps operands
#else
  static constexpr bool kPairs = false;
#endif
  __m512 q[kPairs ? 1 : D16];
  __m512i qb[kPairs ? D16 / 2 : 1];
  void load(const c10::BFloat16* src) {
    if constexpr (kPairs) {
      for (int c = 0; c < D16 / 2; ++c) qb[c] = _mm512_loadu_si512(src + 32 * c);
    } else {
      for (int c = 0; c < D16; ++c) q[c] = load16(src + 16 * c);
    }
  }
  __m512 dot(const c10::BFloat16* k) const {
#if defined(__AVX512BF16__)
    if constexpr (kPairs) {
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < D16 / 2; ++c)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)qb[c], (__m512bh)_mm512_loadu_si512(k + 32 * c));
      return acc;
    }
#endif
    __m512 acc = _mm512_mul_ps(q[0], load16(k));
    for (int c = 1; c < D16; ++c) acc = _mm512_fmadd_ps(q[c], load16(k + 16 * c), acc);
    return acc;
  }
};

// scores[h * n + i] = scale * q_h . k_i for every query head h of the request. Chunk by
// chunk, all heads: each chunk's slots (every KV head's K) are read once, front to back.
template <typename T, int D16>
void score_pass(const T* q, int64_t num_kv_heads, int64_t groups, float scale,
                const Span<T>& span, float* scores) {
  const int64_t n_total = span.end - span.first;
  const __m512 vscale = _mm512_set1_ps(scale);
  span.for_chunks(span.k, [&](int64_t i0, int64_t offset, int64_t n, const Lookahead& ahead) {
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
    for (int64_t h = 0; h < num_kv_heads * groups; ++h) {
      if (ahead.p) ahead.fetch(h, num_kv_heads * groups);
      Query<T, D16> query;
      query.load(q + h * 16 * D16);
      const T* k = span.k + offset + (h / groups) * 16 * D16;
      __m512 part[kChunk];
      for (int p = 0; p < kChunk; ++p)
        part[p] = p < n ? query.dot(k + p * span.slot_stride) : _mm512_setzero_ps();
      const __m512 s = _mm512_mul_ps(transpose_sum(part), vscale);
      _mm512_mask_storeu_ps(scores + h * n_total + i0, valid, s);
    }
  }, span.lines_of_chunk(span.v, span.first));
}

// acc[g][:] += sum_i p[g * n_total + i] * v_i over n rows of V, for kHeads query heads,
// accumulators in registers while the rows stream.
template <typename T, int D16, int kHeads>
void value_chunk(const float* probs, int64_t n_total, const T* v, int64_t slot_stride, int64_t n,
                 float* acc) {
  __m512 a[kHeads][D16];
  for (int g = 0; g < kHeads; ++g)
    for (int c = 0; c < D16; ++c) a[g][c] = _mm512_loadu_ps(acc + g * 16 * D16 + 16 * c);
  for (int64_t i = 0; i < n; ++i, v += slot_stride) {
    __m512 w[kHeads];
    for (int g = 0; g < kHeads; ++g) w[g] = _mm512_set1_ps(probs[g * n_total + i]);
    for (int c = 0; c < D16; ++c) {
      const __m512 vv = load16(v + 16 * c);
      for (int g = 0; g < kHeads; ++g) a[g][c] = _mm512_fmadd_ps(w[g], vv, a[g][c]);
    }
  }
  for (int g = 0; g < kHeads; ++g)
    for (int c = 0; c < D16; ++c) _mm512_storeu_ps(acc + g * 16 * D16 + 16 * c, a[g][c]);
}

// The `groups` query heads of one KV head: as many at once as 24 accumulator registers allow
// (at most 4), the rest in smaller passes.
template <typename T, int D16, int kHeads = std::max(1, std::min(4, 24 / D16))>
void value_group(const float* probs, int64_t groups, int64_t n_total, const T* v,
                 int64_t slot_stride, int64_t n, float* acc) {
  int64_t h = 0;
  for (; h + kHeads <= groups; h += kHeads)
    value_chunk<T, D16, kHeads>(probs + h * n_total, n_total, v, slot_stride, n,
                                acc + h * 16 * D16);
  if constexpr (kHeads > 1) {
    if (h < groups)
      value_group<T, D16, kHeads - 1>(probs + h * n_total, groups - h, n_total, v, slot_stride,
                                      n, acc + h * 16 * D16);
  }
}

// acc[h][:] = sum_i p[h * n + i] * v_i for every query head, chunk by chunk as for K.
template <typename T, int D16>
void value_pass(const float* probs, int64_t num_kv_heads, int64_t groups, const Span<T>& span,
                float* acc, const Lookahead& after) {
  const int64_t n_total = span.end - span.first;
  std::fill(acc, acc + num_kv_heads * groups * 16 * D16, 0.f);
  span.for_chunks(span.v, [&](int64_t i0, int64_t offset, int64_t n, const Lookahead& ahead) {
    for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
      if (ahead.p) ahead.fetch(kvh, num_kv_heads);
      value_group<T, D16>(probs + kvh * groups * n_total + i0, groups, n_total,
                          span.v + offset + kvh * 16 * D16, span.slot_stride, n,
                          acc + kvh * groups * 16 * D16);
    }
  }, after);
}

}  // namespace tokenmill::attention::avx512

#endif  // TOKENMILL_AVX512
