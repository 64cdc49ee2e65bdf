// The two passes of decode attention over an int8 cache with AVX512-VNNI: integer products,
// 32 per instruction (vpdpwssd: pairs of int16 products summed into int32 lanes).
//
// Scores: each query head is rounded to int16 with its own scale (2^-15 of its largest element,
// far below the cache's own rounding); over the dim-pair-major K (paged_attention_paired.h) a
// lane per slot accumulates the exact int32 dot product, times (query scale x slot scale x
// softmax scale) at the end: no transposes, no widening per query head.
// Weighted sum of V: per chunk of slots and query head, the weights p_i * scale_i are rounded to
// int16 against their largest (error 2^-16 of it); two slots' values are interleaved into int16
// pairs so one vpdpwssd adds both slots' contributions to 16 dims, and the chunk's int32 sums
// are folded into fp32 accumulators once per chunk.
//
// The interleaving permutes dims within 32-dim groups; the fp32 accumulators keep that order
// during the pass and are put back in order at its end (unpermute).
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "paged_attention_paired.h"
#include "paged_attention_quant.h"

#if TOKENMILL_AVX512 && defined(__AVX512VNNI__)
#define TOKENMILL_VNNI_ATTENTION 1

namespace tokenmill::attention::vnni {

inline __m512i widen(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Each of `heads` rows of q [heads, dim] rounded to int16: q16 = round(q / scale).
template <typename Q>
void quantize_queries(const Q* q, int64_t heads, int64_t dim, int16_t* q16, float* scales) {
  for (int64_t h = 0; h < heads; ++h) {
    float amax = 0.f;
    for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::abs(to_float(q[h * dim + d])));
    scales[h] = amax / 32767.f;
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    for (int64_t d = 0; d < dim; ++d)
      q16[h * dim + d] = static_cast<int16_t>(std::nearbyint(to_float(q[h * dim + d]) * inv));
  }
}

// kHeads query heads against n <= kChunk slots of one KV head's dim-pair-major K: per dim pair,
// one load of the slots' pairs and one vpdpwssd per head (q's pair broadcast) into a lane per
// slot. k: the pair-0 row at the chunk's first slot; q_pairs: each head's dim/2 int16 pairs.
template <int kHeads>
void score_heads(const int32_t* q_pairs, const float* q_scales, const int8_t* k,
                 int64_t block_size, int64_t half_dim, int64_t n, const float* factor,
                 float* out, int64_t n_total) {
  const __mmask32 valid_bytes = static_cast<__mmask32>((uint64_t{1} << (2 * n)) - 1);
  // Two accumulators per head (even and odd pairs): twice the products in flight.
  __m512i acc[2][kHeads];
  for (int g = 0; g < kHeads; ++g) acc[0][g] = acc[1][g] = _mm512_setzero_si512();
  for (int64_t p = 0; p < half_dim; ++p, k += 2 * block_size) {
    const __m512i pairs = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(valid_bytes, k));
    __m512i* a = acc[p % 2];
    for (int g = 0; g < kHeads; ++g)
      a[g] = _mm512_dpwssd_epi32(a[g], pairs, _mm512_set1_epi32(q_pairs[g * half_dim + p]));
  }
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
  const __m512 f = _mm512_loadu_ps(factor);
  for (int g = 0; g < kHeads; ++g) {
    const __m512i sum = _mm512_add_epi32(acc[0][g], acc[1][g]);
    const __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), f);
    _mm512_mask_storeu_ps(out + g * n_total, valid, _mm512_mul_ps(s, _mm512_set1_ps(q_scales[g])));
  }
}

template <int kHeads = 8>
void score_group(const int32_t* q_pairs, const float* q_scales, int64_t groups, const int8_t* k,
                 int64_t block_size, int64_t half_dim, int64_t n, const float* factor,
                 float* out, int64_t n_total) {
  int64_t h = 0;
  for (; h + kHeads <= groups; h += kHeads)
    score_heads<kHeads>(q_pairs + h * half_dim, q_scales + h, k, block_size, half_dim, n, factor,
                        out + h * n_total, n_total);
  if constexpr (kHeads > 1) {
    if (h < groups)
      score_group<kHeads - 1>(q_pairs + h * half_dim, q_scales + h, groups - h, k, block_size,
                              half_dim, n, factor, out + h * n_total, n_total);
  }
}

// scores[h * n + i] = scale * q_h . k_i for every query head h, chunk by chunk, KV head by KV
// head (each reads its own part of the block).
template <typename Q, int D16>
void score_pass(const Q* q, int64_t num_kv_heads, int64_t groups, float scale,
                const Span<int8_t>& span, float* scores) {
  const int64_t n_total = span.end - span.first, dim = span.dim, heads = num_kv_heads * groups;
  std::vector<int16_t> q16(heads * dim);
  std::vector<float> q_scales(heads);
  quantize_queries(q, heads, dim, q16.data(), q_scales.data());
  const auto* q_pairs = reinterpret_cast<const int32_t*>(q16.data());
  span.template for_chunks<kLookaheadChunks>(span.k, [&](int64_t i0, int64_t offset, int64_t n,
                                                         const Lookahead& ahead) {
    for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
      if (ahead.p) ahead.fetch(kvh, num_kv_heads);
      alignas(64) float factor[kChunk];
      chunk_scales(span.k_scale + span.scale_index(offset, kvh), n, scale, factor);
      score_group(q_pairs + kvh * groups * dim / 2, q_scales.data() + kvh * groups, groups,
                  span.k + paired_offset(span, offset, kvh), span.block_size, dim / 2, n, factor,
                  scores + kvh * groups * n_total + i0, n_total);
    }
  }, span.lines_of_chunk(span.v, span.first));
}

// The int16 weights of one query head over a chunk, w_i = p_i * scale_i rounded against their
// largest (lanes past n: 0), as 16 int16 in a 256-bit register; returns the rounding's step.
inline float chunk_weights(const float* probs, __m512 slot_scales, __mmask16 valid,
                           __m256i* out) {
  const __m512 w = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, probs), slot_scales);
  const float wmax = _mm512_reduce_max_ps(w);  // weights are >= 0; 0 for empty lanes
  const __m512 inv = _mm512_set1_ps(wmax > 0.f ? 32767.f / wmax : 0.f);
  *out = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(w, inv)));
  return wmax / 32767.f;
}

// acc[g] (fp32, permuted dims) += sum_i p[g * n_total + i] * w[i] * v_i over n slots.
template <int D16, int kHeads>
void value_chunk(const float* probs, int64_t n_total, const float* w, const int8_t* v,
                 int64_t slot_stride, int64_t n, float* acc) {
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
  const __m512 scales = _mm512_loadu_ps(w);
  __m512i weights[kHeads];  // 16 int16 in the low half: lane j of the 32-bit view = slots 2j, 2j+1
  float steps[kHeads];
  for (int g = 0; g < kHeads; ++g) {
    __m256i packed;
    steps[g] = chunk_weights(probs + g * n_total, scales, valid, &packed);
    weights[g] = _mm512_castsi256_si512(packed);
  }
  __m512i a[kHeads][D16];
  for (int g = 0; g < kHeads; ++g)
    for (int c = 0; c < D16; ++c) a[g][c] = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 2) {
    const int8_t* row = v + i * slot_stride;
    const int8_t* next = i + 1 < n ? row + slot_stride : row;  // its weight is 0 then
    const __m512i lane = _mm512_set1_epi32(static_cast<int>(i / 2));
    __m512i pair[kHeads];
    for (int g = 0; g < kHeads; ++g) pair[g] = _mm512_permutexvar_epi32(lane, weights[g]);
    for (int c = 0; c < D16 / 2; ++c) {
      const __m512i x = widen(row + 32 * c), y = widen(next + 32 * c);
      const __m512i lo = _mm512_unpacklo_epi16(x, y), hi = _mm512_unpackhi_epi16(x, y);
      for (int g = 0; g < kHeads; ++g) {
        a[g][2 * c] = _mm512_dpwssd_epi32(a[g][2 * c], lo, pair[g]);
        a[g][2 * c + 1] = _mm512_dpwssd_epi32(a[g][2 * c + 1], hi, pair[g]);
      }
    }
  }
  for (int g = 0; g < kHeads; ++g) {
    const __m512 step = _mm512_set1_ps(steps[g]);
    for (int c = 0; c < D16; ++c) {
      float* dst = acc + g * 16 * D16 + 16 * c;
      _mm512_storeu_ps(dst, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[g][c]), step, _mm512_loadu_ps(dst)));
    }
  }
}

template <int D16, int kHeads = std::max(1, std::min(4, 20 / D16))>
void value_group(const float* probs, int64_t groups, int64_t n_total, const float* w,
                 const int8_t* v, int64_t slot_stride, int64_t n, float* acc) {
  int64_t h = 0;
  for (; h + kHeads <= groups; h += kHeads)
    value_chunk<D16, kHeads>(probs + h * n_total, n_total, w, v, slot_stride, n,
                             acc + h * 16 * D16);
  if constexpr (kHeads > 1) {
    if (h < groups)
      value_group<D16, kHeads - 1>(probs + h * n_total, groups - h, n_total, w, v, slot_stride,
                                   n, acc + h * 16 * D16);
  }
}

// Puts each head's dims back in order: within a 32-dim group the accumulators hold dims
// (8 * (j / 4) + j % 4) for j < 16 (the low halves of the pairs), then those + 4.
inline void unpermute(float* acc, int64_t heads, int64_t dim) {
  std::vector<float> row(dim);
  for (int64_t h = 0; h < heads; ++h) {
    float* a = acc + h * dim;
    for (int64_t c = 0; c < dim; c += 32)
      for (int j = 0; j < 16; ++j) {
        row[c + 8 * (j / 4) + j % 4] = a[c + j];
        row[c + 8 * (j / 4) + 4 + j % 4] = a[c + 16 + j];
      }
    std::copy(row.begin(), row.end(), a);
  }
}

template <int D16>
void value_pass(const float* probs, int64_t num_kv_heads, int64_t groups,
                const Span<int8_t>& span, float* acc, const Lookahead& after) {
  const int64_t n_total = span.end - span.first, dim = 16 * D16;
  std::fill(acc, acc + num_kv_heads * groups * dim, 0.f);
  span.template for_chunks<kLookaheadChunks>(span.v, [&](int64_t i0, int64_t offset, int64_t n,
                                                         const Lookahead& ahead) {
    for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
      if (ahead.p) ahead.fetch(kvh, num_kv_heads);
      float w[kChunk];
      chunk_scales(span.v_scale + span.scale_index(offset, kvh), n, 1.f, w);
      value_group<D16>(probs + kvh * groups * n_total + i0, groups, n_total, w,
                       span.v + offset + kvh * dim, span.slot_stride, n,
                       acc + kvh * groups * dim);
    }
  }, after);
  unpermute(acc, num_kv_heads * groups, dim);
}

}  // namespace tokenmill::attention::vnni

#else
#define TOKENMILL_VNNI_ATTENTION 0
#endif
