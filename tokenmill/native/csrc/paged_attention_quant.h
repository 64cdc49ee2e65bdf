// The two passes of decode attention over a quantized cache: int8 or fp8 (e4m3) values with
// one bf16 scale per (slot, KV head), x = scale * value (paged_attention_kv_quant.h writes
// them). A score is the dot product with the raw values times the slot's scale (one multiply
// per score); in the weighted sum of V the scale folds into the slot's probability. The cache
// is half the bytes of bf16.
//
// Here: the scales, fp8's K passes (slot-major K, as a float cache) and the V passes of both
// (AVX-512: a slot's values widened to fp32 once per KV head for all the query heads of its
// group; portable: plain loops). An int8 K cache is dim-pair-major: paged_attention_paired.h.
#pragma once

#include <algorithm>
#include <array>
#include <cstring>

#include "paged_attention.h"
#include "paged_attention_avx512.h"

namespace tokenmill::attention {

// How many chunks ahead the passes fetch: one chunk's arithmetic over an int8 block hides too
// little of the next block's memory latency.
constexpr int kLookaheadChunks = 2;

// The scales of a chunk's n <= kChunk slots for one KV head (contiguous), times `factor`, as
// fp32; the rest zero.
inline void chunk_scales(const c10::BFloat16* s, int64_t n, float factor, float* out) {
#if TOKENMILL_AVX512
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
  const __m256i bits = _mm256_maskz_loadu_epi16(valid, s);
  const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  _mm512_storeu_ps(out, _mm512_mul_ps(x, _mm512_set1_ps(factor)));
#else
  for (int64_t i = 0; i < kChunk; ++i)
    out[i] = i < n ? bf16_bits_to_float(s[i].x) * factor : 0.f;
#endif
}

// The value of a cached element: int8 as is; fp8 through a table of its 256 codes.
inline const float* fp8_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i)
      t[i] = static_cast<float>(Fp8(static_cast<uint8_t>(i), Fp8::from_bits()));
    return t;
  }();
  return table.data();
}

}  // namespace tokenmill::attention

#if TOKENMILL_AVX512

namespace tokenmill::attention::avx512 {

// 16 cached values widened to fp32, times unit<C>(): int8 exactly; fp8 exactly times 2^-8:
// e4m3's bits sign-extended to 16 and shifted left by 7 are the fp16 bits of value * 2^-8 once
// bit 14 (a copy of the sign) is cleared (subnormals included), and fp16 -> fp32 is exact.
inline __m512 load_values(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load_values(const Fp8* p) {
  const __m256i wide = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i half_bits = _mm256_and_si256(_mm256_slli_epi16(wide, 7),
                                             _mm256_set1_epi16(static_cast<int16_t>(0xBF80)));
  return _mm512_cvtph_ps(half_bits);
}

// What load_values' results must be multiplied by to give the stored values.
template <typename C>
constexpr float unit() {
  return std::is_same_v<C, Fp8> ? 256.f : 1.f;
}

// kHeads query heads of one KV head against n <= kChunk slots: the scores of head g go to
// out[g * n_total + i], times factor[i] (the slot's scale times the softmax scale).
template <typename Q, typename C, int D16, int kHeads>
void score_heads(const Q* q, const C* k, int64_t slot_stride, int64_t n, const float* factor,
                 float* out, int64_t n_total) {
  __m512 qv[kHeads][D16];
  for (int g = 0; g < kHeads; ++g)
    for (int c = 0; c < D16; ++c) qv[g][c] = load16(q + g * 16 * D16 + 16 * c);
  __m512 part[kHeads][kChunk];
  for (int p = 0; p < kChunk; ++p) {
    if (p >= n) {
      for (int g = 0; g < kHeads; ++g) part[g][p] = _mm512_setzero_ps();
      continue;
    }
    __m512 kv[D16];
    for (int c = 0; c < D16; ++c) kv[c] = load_values(k + p * slot_stride + 16 * c);
    for (int g = 0; g < kHeads; ++g) {
      __m512 acc = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int c = 1; c < D16; ++c) acc = _mm512_fmadd_ps(qv[g][c], kv[c], acc);
      part[g][p] = acc;
    }
  }
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
  const __m512 f = _mm512_loadu_ps(factor);
  for (int g = 0; g < kHeads; ++g)
    _mm512_mask_storeu_ps(out + g * n_total, valid, _mm512_mul_ps(transpose_sum(part[g]), f));
}

// The `groups` query heads of one KV head, as many at once as the registers allow.
template <typename Q, typename C, int D16, int kHeads = std::max(1, std::min(4, 20 / D16))>
void score_group(const Q* q, int64_t groups, const C* k, int64_t slot_stride, int64_t n,
                 const float* factor, float* out, int64_t n_total) {
  int64_t h = 0;
  for (; h + kHeads <= groups; h += kHeads)
    score_heads<Q, C, D16, kHeads>(q + h * 16 * D16, k, slot_stride, n, factor,
                                   out + h * n_total, n_total);
  if constexpr (kHeads > 1) {
    if (h < groups)
      score_group<Q, C, D16, kHeads - 1>(q + h * 16 * D16, groups - h, k, slot_stride, n, factor,
                                         out + h * n_total, n_total);
  }
}

// scores[h * n + i] = scale * q_h . k_i for every query head h, chunk by chunk, KV head by KV
// head: each slot's values are widened once for the whole group.
template <typename Q, typename C, int D16>
void score_pass_quant(const Q* q, int64_t num_kv_heads, int64_t groups, float scale,
                      const Span<C>& span, float* scores) {
  const int64_t n_total = span.end - span.first, dim = 16 * D16;
  span.template for_chunks<kLookaheadChunks>(span.k, [&](int64_t i0, int64_t offset, int64_t n, const Lookahead& ahead) {
    for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
      if (ahead.p) ahead.fetch(kvh, num_kv_heads);
      alignas(64) float factor[kChunk];
      chunk_scales(span.k_scale + span.scale_index(offset, kvh), n, scale * unit<C>(), factor);
      score_group<Q, C, D16>(q + kvh * groups * dim, groups, span.k + offset + kvh * dim,
                             span.slot_stride, n, factor, scores + kvh * groups * n_total + i0,
                             n_total);
    }
  }, span.lines_of_chunk(span.v, span.first));
}

// acc[g][:] += sum_i p[g * n_total + i] * w[i] * v_i over n slots of V, for kHeads query heads
// (w: the slots' scales), accumulators in registers while the slots stream.
template <typename C, int D16, int kHeads>
void value_chunk_quant(const float* probs, int64_t n_total, const float* w, const C* v,
                       int64_t slot_stride, int64_t n, float* acc) {
  __m512 a[kHeads][D16];
  for (int g = 0; g < kHeads; ++g)
    for (int c = 0; c < D16; ++c) a[g][c] = _mm512_loadu_ps(acc + g * 16 * D16 + 16 * c);
  for (int64_t i = 0; i < n; ++i, v += slot_stride) {
    __m512 pw[kHeads];
    for (int g = 0; g < kHeads; ++g) pw[g] = _mm512_set1_ps(probs[g * n_total + i] * w[i]);
    for (int c = 0; c < D16; ++c) {
      const __m512 vv = load_values(v + 16 * c);
      for (int g = 0; g < kHeads; ++g) a[g][c] = _mm512_fmadd_ps(pw[g], vv, a[g][c]);
    }
  }
  for (int g = 0; g < kHeads; ++g)
    for (int c = 0; c < D16; ++c) _mm512_storeu_ps(acc + g * 16 * D16 + 16 * c, a[g][c]);
}

template <typename C, int D16, int kHeads = std::max(1, std::min(4, 24 / D16))>
void value_group_quant(const float* probs, int64_t groups, int64_t n_total, const float* w,
                       const C* v, int64_t slot_stride, int64_t n, float* acc) {
  int64_t h = 0;
  for (; h + kHeads <= groups; h += kHeads)
    value_chunk_quant<C, D16, kHeads>(probs + h * n_total, n_total, w, v, slot_stride, n,
                                      acc + h * 16 * D16);
  if constexpr (kHeads > 1) {
    if (h < groups)
      value_group_quant<C, D16, kHeads - 1>(probs + h * n_total, groups - h, n_total, w, v,
                                            slot_stride, n, acc + h * 16 * D16);
  }
}

// acc[h][:] = sum_i p[h * n + i] * x_i for every query head, chunk by chunk as for K.
template <typename C, int D16>
void value_pass_quant(const float* probs, int64_t num_kv_heads, int64_t groups,
                      const Span<C>& span, float* acc, const Lookahead& after) {
  const int64_t n_total = span.end - span.first, dim = 16 * D16;
  std::fill(acc, acc + num_kv_heads * groups * dim, 0.f);
  span.template for_chunks<kLookaheadChunks>(span.v, [&](int64_t i0, int64_t offset, int64_t n, const Lookahead& ahead) {
    for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
      if (ahead.p) ahead.fetch(kvh, num_kv_heads);
      float w[kChunk];
      chunk_scales(span.v_scale + span.scale_index(offset, kvh), n, unit<C>(), w);
      value_group_quant<C, D16>(probs + kvh * groups * n_total + i0, groups, n_total, w,
                                span.v + offset + kvh * dim, span.slot_stride, n,
                                acc + kvh * groups * dim);
    }
  }, after);
}

}  // namespace tokenmill::attention::avx512

#endif  // TOKENMILL_AVX512

namespace tokenmill::attention::portable {

inline float cached_value(int8_t x, const float*) { return static_cast<float>(x); }
inline float cached_value(Fp8 x, const float* fp8_table) { return fp8_table[x.x]; }

// scores[h * n + i] = scale * q_h . k_i for every query head h of the request.
template <typename Q, typename C, int D16>
void score_pass_quant(const Q* q, int64_t num_kv_heads, int64_t groups, float scale,
                      const Span<C>& span, float* scores) {
  const int64_t n_total = span.end - span.first;
  const int64_t dim = D16 > 0 ? kLanes * D16 : span.dim;
  const float* table = fp8_values();
  span.template for_chunks<kLookaheadChunks>(span.k, [&](int64_t i0, int64_t offset, int64_t n, const Lookahead& ahead) {
    for (int64_t h = 0; h < num_kv_heads * groups; ++h) {
      if (ahead.p) ahead.fetch(h, num_kv_heads * groups);
      const int64_t kvh = h / groups;
      float factor[kChunk];
      chunk_scales(span.k_scale + span.scale_index(offset, kvh), n, scale, factor);
      for (int64_t i = 0; i < n; ++i) {
        const C* k = span.k + offset + i * span.slot_stride + kvh * dim;
        float lanes[kLanes] = {};
        for (int64_t d = 0; d < dim; d += kLanes)
          for (int l = 0; l < kLanes; ++l)
            lanes[l] += to_float(q[h * dim + d + l]) * cached_value(k[d + l], table);
        float sum = 0.f;
        for (int l = 0; l < kLanes; ++l) sum += lanes[l];
        scores[h * n_total + i0 + i] = sum * factor[i];
      }
    }
  }, span.lines_of_chunk(span.v, span.first));
}

// acc[h][:] = sum_i p[h * n + i] * x_i for every query head, chunk by chunk as for K.
template <typename C, int D16>
void value_pass_quant(const float* probs, int64_t num_kv_heads, int64_t groups,
                      const Span<C>& span, float* acc, const Lookahead& after) {
  const int64_t n_total = span.end - span.first;
  const int64_t dim = D16 > 0 ? kLanes * D16 : span.dim;
  const float* table = fp8_values();
  std::fill(acc, acc + num_kv_heads * groups * dim, 0.f);
  span.template for_chunks<kLookaheadChunks>(span.v, [&](int64_t i0, int64_t offset, int64_t n, const Lookahead& ahead) {
    for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
      if (ahead.p) ahead.fetch(kvh, num_kv_heads);
      float w[kChunk];
      chunk_scales(span.v_scale + span.scale_index(offset, kvh), n, 1.f, w);
      for (int64_t h = kvh * groups; h < (kvh + 1) * groups; ++h) {
        float* a = acc + h * dim;
        for (int64_t i = 0; i < n; ++i) {
          const float p = probs[h * n_total + i0 + i] * w[i];
          const C* v = span.v + offset + i * span.slot_stride + kvh * dim;
          for (int64_t d = 0; d < dim; ++d) a[d] += p * cached_value(v[d], table);
        }
      }
    }
  }, after);
}

}  // namespace tokenmill::attention::portable
