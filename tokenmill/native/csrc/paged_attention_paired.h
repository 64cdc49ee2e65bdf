// An int8 K cache is stored dim-pair-major within each block, so that the scores of up to 16
// slots build up in the lanes of one register (a lane per slot) instead of each slot's dot
// product being summed across lanes (16 partial vectors transposed per 16 scores):
//
//   block b, KV head h:   [D/2][BS][2] int8     element (slot s, dim d) at
//                         b * block_stride + h * BS * D + (d / 2) * 2 * BS + 2 * s + d % 2
//
// The block has the size of a slot-major one; V stays slot-major. Written by
// paged_attention_kv_quant.h, read back by tokenmill/attention/kv_quant.py.
//
// Score passes over it: AVX-512 in fp32 (each pair row widened once, two FMAs per query head),
// portable loops; with AVX512-VNNI, integer products (paged_attention_vnni.h).
#pragma once

#include <algorithm>
#include <vector>

#include "paged_attention.h"
#include "paged_attention_quant.h"

namespace tokenmill::attention {

// Element offset of KV head kvh's pair-0 row at the chunk's first slot (`offset`: the chunk's
// slot-major element offset, as Span::chunk_at gives it).
inline int64_t paired_offset(const Span<int8_t>& span, int64_t offset, int64_t kvh) {
  const int64_t block = offset / span.block_stride;
  const int64_t slot = offset % span.block_stride / span.slot_stride;
  return block * span.block_stride + kvh * span.block_size * span.dim + 2 * slot;
}

// The query heads in fp32 (broadcast from memory by the score passes).
template <typename Q>
std::vector<float> queries_as_float(const Q* q, int64_t n) {
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = to_float(q[i]);
  return out;
}

}  // namespace tokenmill::attention

#if TOKENMILL_AVX512

namespace tokenmill::attention::avx512 {

// kHeads query heads (fp32) against n <= kChunk slots from k (see vnni::score_heads).
template <int kHeads>
void score_paired_heads(const float* q, const int8_t* k, int64_t block_size, int64_t dim,
                        int64_t n, const float* factor, float* out, int64_t n_total) {
  const __mmask32 valid_bytes = static_cast<__mmask32>((uint64_t{1} << (2 * n)) - 1);
  __m512 acc[2][kHeads];  // even and odd dims: independent chains of FMAs
  for (int g = 0; g < kHeads; ++g) acc[0][g] = acc[1][g] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 2, k += 2 * block_size) {
    const __m512i pairs = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(valid_bytes, k));
    const __m512 even = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(pairs, 16), 16));
    const __m512 odd = _mm512_cvtepi32_ps(_mm512_srai_epi32(pairs, 16));
    for (int g = 0; g < kHeads; ++g) {
      acc[0][g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * dim + d]), even, acc[0][g]);
      acc[1][g] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * dim + d + 1]), odd, acc[1][g]);
    }
  }
  const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
  const __m512 f = _mm512_loadu_ps(factor);
  for (int g = 0; g < kHeads; ++g) {
    const __m512 s = _mm512_add_ps(acc[0][g], acc[1][g]);
    _mm512_mask_storeu_ps(out + g * n_total, valid, _mm512_mul_ps(s, f));
  }
}

template <int kHeads = 8>
void score_paired_group(const float* q, int64_t groups, const int8_t* k, int64_t block_size,
                        int64_t dim, int64_t n, const float* factor, float* out,
                        int64_t n_total) {
  int64_t h = 0;
  for (; h + kHeads <= groups; h += kHeads)
    score_paired_heads<kHeads>(q + h * dim, k, block_size, dim, n, factor, out + h * n_total,
                               n_total);
  if constexpr (kHeads > 1) {
    if (h < groups)
      score_paired_group<kHeads - 1>(q + h * dim, groups - h, k, block_size, dim, n, factor,
                                     out + h * n_total, n_total);
  }
}

template <typename Q, int D16>
void score_pass_paired(const Q* q, int64_t num_kv_heads, int64_t groups, float scale,
                       const Span<int8_t>& span, float* scores) {
  const int64_t n_total = span.end - span.first, dim = span.dim;
  const std::vector<float> qf = queries_as_float(q, num_kv_heads * groups * dim);
  span.template for_chunks<kLookaheadChunks>(span.k, [&](int64_t i0, int64_t offset, int64_t n,
                                                         const Lookahead& ahead) {
    for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh) {
      if (ahead.p) ahead.fetch(kvh, num_kv_heads);
      alignas(64) float factor[kChunk];
      chunk_scales(span.k_scale + span.scale_index(offset, kvh), n, scale, factor);
      score_paired_group(qf.data() + kvh * groups * dim, groups,
                         span.k + paired_offset(span, offset, kvh), span.block_size, dim, n,
                         factor, scores + kvh * groups * n_total + i0, n_total);
    }
  }, span.lines_of_chunk(span.v, span.first));
}

}  // namespace tokenmill::attention::avx512

#endif  // TOKENMILL_AVX512

namespace tokenmill::attention::portable {

// scores[h * n + i] = scale * q_h . k_i for every query head h of the request.
template <typename Q, int D16>
void score_pass_paired(const Q* q, int64_t num_kv_heads, int64_t groups, float scale,
                       const Span<int8_t>& span, float* scores) {
  const int64_t n_total = span.end - span.first, dim = span.dim, bs = span.block_size;
  const std::vector<float> qf = queries_as_float(q, num_kv_heads * groups * dim);
  span.template for_chunks<kLookaheadChunks>(span.k, [&](int64_t i0, int64_t offset, int64_t n,
                                                         const Lookahead& ahead) {
    for (int64_t h = 0; h < num_kv_heads * groups; ++h) {
      if (ahead.p) ahead.fetch(h, num_kv_heads * groups);
      const int64_t kvh = h / groups;
      float factor[kChunk], acc[kChunk] = {};
      chunk_scales(span.k_scale + span.scale_index(offset, kvh), n, scale, factor);
      const int8_t* k = span.k + paired_offset(span, offset, kvh);
      for (int64_t d = 0; d < dim; ++d) {
        const int8_t* row = k + (d / 2) * 2 * bs + d % 2;
        const float qd = qf[h * dim + d];
        for (int64_t i = 0; i < n; ++i) acc[i] += qd * row[2 * i];
      }
      for (int64_t i = 0; i < n; ++i) scores[h * n_total + i0 + i] = acc[i] * factor[i];
    }
  }, span.lines_of_chunk(span.v, span.first));
}

}  // namespace tokenmill::attention::portable
