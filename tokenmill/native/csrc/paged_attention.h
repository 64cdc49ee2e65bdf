// Decode attention over the paged KV cache on the CPU, reading each request's K/V blocks in
// place (no gather copy, no padding to the longest request).
//
// One task per (request, context partition), all heads: the cache is read chunk by chunk,
// every KV head of a slot together, so each block streams front to back (and the next one is
// prefetched), once for the scores and once for the weighted sum of V.
// When there are too few requests to keep every thread busy (small batches, long contexts)
// the context is split into partitions whose partial results (max, sum, unnormalised output)
// are merged by log-sum-exp afterwards, as in flash-decoding.
//
//   q            [B, H, D]            float32 or bfloat16, D a multiple of 16
//   k/v cache    [NB, BS, Hkv, D]     same dtype as q, or int8 / fp8 (e4m3) with
//   k/v scales   [NB, Hkv, BS] bf16   one scale per (slot, KV head): x = scale * value
//                (an int8 K cache keeps each block's K dim-pair-major: paged_attention_quant.h)
//   block_table  [B, MB] int64        seq_lens [B] int64
//   out          [B, H, D]            dtype of q
//
// Files: this header (the task's view of the cache, the problem), paged_attention_avx512.h
// and paged_attention_portable.h (the two passes over the cache, per instruction set),
// paged_attention_quant.h (the passes over int8 / fp8 caches), paged_attention_driver.h
// (tasks, partitions, merge), paged_attention_{f32,bf16,int8,fp8}.cpp (one translation unit
// per cache dtype, compiled in parallel), paged_attention_kv_quant.h (quantizing K/V into a
// slot) and paged_attention_cpu.cpp (the entries).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include <c10/util/Float8_e4m3fn.h>

#include "simd.h"

#if defined(__SSE__)
#include <immintrin.h>
#endif

namespace tokenmill::attention {

constexpr int64_t kMaxDim = 256;
constexpr int64_t kChunk = 16;          // positions scored together
constexpr int64_t kMinPartition = 256;  // positions per partition, at least

// What one call attends: shapes, the block table, the options.
struct DecodeProblem {
  int64_t num_reqs, num_heads, num_kv_heads, block_size, dim;
  int64_t block_stride;  // elements per cache block
  int64_t table_stride;  // block_table's row stride
  const int64_t* table;
  const int64_t* lens;
  float scale;
  int64_t window;  // 0: none
  // Quantized caches only: the scales [NB, Hkv, BS] of K and of V.
  const c10::BFloat16* k_scales = nullptr;
  const c10::BFloat16* v_scales = nullptr;

  int64_t groups() const { return num_heads / num_kv_heads; }

  // Positions [first, end) request b attends to.
  std::pair<int64_t, int64_t> range(int64_t b) const {
    const int64_t len = lens[b];
    return {window > 0 ? std::max<int64_t>(0, len - window) : 0, len};
  }
};

using Fp8 = c10::Float8_e4m3fn;

// Whether a cache of C holds quantized values (with scales) rather than the query's dtype.
template <typename C>
constexpr bool kQuantized = std::is_same_v<C, int8_t> || std::is_same_v<C, Fp8>;

// out = softmax(q K^T * scale) V for every request. Q (float, c10::BFloat16) is the dtype of q
// and out; C that of the cache: Q itself, or int8_t / Fp8 with the problem's scales.
template <typename Q, typename C = Q>
void decode_attention(const DecodeProblem& p, const Q* q, const C* k_cache, const C* v_cache,
                      Q* out);

// Cache lines wanted soon (the next chunk), requested a share at a time while the current
// chunk computes. Requesting a whole chunk at once fills the core's miss slots and stalls the
// loads of the chunk being computed behind them; in shares, the misses stay in flight under
// the arithmetic (decode attention at batch 128 from DRAM: 0.48 -> 0.39 ms per layer).
// A quantized cache's chunk also has its scales, a line or two elsewhere: fetched with the
// first share (without them, each chunk's scales were a miss to memory: 1/3 of the time).
struct Lookahead {
  const char* p = nullptr;
  int64_t bytes = 0;
  const char* scales = nullptr;
  int64_t scale_bytes = 0;
  void fetch(int64_t share, int64_t shares) const {
#if defined(__SSE__)
    for (int64_t b = bytes * share / shares / 64 * 64; b < bytes * (share + 1) / shares; b += 64)
      _mm_prefetch(p + b, _MM_HINT_T0);
    if (share == 0 && scales)
      for (int64_t b = 0; b < scale_bytes; b += 64) _mm_prefetch(scales + b, _MM_HINT_T0);
#else
    (void)share;
    (void)shares;
#endif
  }
};

// Where the task's positions live: positions [first, end) of one request, all KV heads.
template <typename T>
struct Span {
  const T* k;  // the K cache (block 0, slot 0, KV head 0)
  const T* v;
  const int64_t* blocks;
  int64_t block_size, block_stride, slot_stride;
  int64_t first, end;
  int64_t dim;        // head_dim
  int64_t row_bytes;  // one slot: all its KV heads' K (or V)
  // Quantized caches: the scales of K and V, [NB, Hkv, BS] (scale_index). An int8 K cache
  // is dim-pair-major within each block (k_paired): its chunks' lines are the whole block's.
  const c10::BFloat16* k_scale = nullptr;
  const c10::BFloat16* v_scale = nullptr;
  bool k_paired = false;

  int64_t num_kv_heads() const { return slot_stride / dim; }

  // The scale of KV head kvh at the slot of element offset `offset` (a chunk's first slot);
  // the chunk's next slots' scales follow it.
  int64_t scale_index(int64_t offset, int64_t kvh) const {
    const int64_t block = offset / block_stride, slot = offset % block_stride / slot_stride;
    return (block * num_kv_heads() + kvh) * block_size + slot;
  }

  // The run of consecutive slots from `pos` inside one block (at most kChunk): its element
  // offset from the cache's start and its length.
  std::pair<int64_t, int64_t> chunk_at(int64_t pos) const {
    const int64_t off = pos % block_size;
    return {blocks[pos / block_size] * block_stride + off * slot_stride,
            std::min({kChunk, block_size - off, end - pos})};
  }

  Lookahead lines_of_chunk(const T* base, int64_t pos) const {
    if (pos >= end) return {};
    const auto [offset, n] = chunk_at(pos);
    const c10::BFloat16* scale = base == k ? k_scale : v_scale;
    if (!scale) return {reinterpret_cast<const char*>(base + offset), n * row_bytes};
    const int64_t block_start = offset - offset % block_stride;
    const bool whole_block = base == k && k_paired;
    return {reinterpret_cast<const char*>(base + (whole_block ? block_start : offset)),
            whole_block ? block_stride * static_cast<int64_t>(sizeof(T)) : n * row_bytes,
            reinterpret_cast<const char*>(scale + scale_index(block_start, 0)),
            static_cast<int64_t>(num_kv_heads() * block_size * sizeof(c10::BFloat16))};
  }

  // Calls f(offset from first, element offset of the chunk's first slot, n <= kChunk, ahead)
  // for each chunk in order; `ahead` holds the next chunk's lines (after the last chunk,
  // `after`: what the caller reads next), for f to prefetch a share at a time. Blocks lie
  // anywhere in the cache, so the hardware prefetchers cannot run ahead across them. The
  // first chunk is requested whole (a no-op when the previous pass already fetched it).
  // kDistance > 1 holds the chunk that many ahead instead (the first ones requested whole):
  // for passes that compute less per byte (a quantized cache), so that lines arrive in time.
  template <int kDistance = 1, typename F>
  void for_chunks(const T* base, F&& f, const Lookahead& after = {}) const {
    int64_t ahead_pos = first;
    for (int d = 0; d < kDistance; ++d) {
      lines_of_chunk(base, ahead_pos).fetch(0, 1);
      if (ahead_pos < end) ahead_pos += chunk_at(ahead_pos).second;
    }
    bool is_after_sent = false;
    for (int64_t pos = first; pos < end;) {
      const auto [offset, n] = chunk_at(pos);
      Lookahead ahead;
      if (ahead_pos < end) {
        ahead = lines_of_chunk(base, ahead_pos);
        ahead_pos += chunk_at(ahead_pos).second;
      } else if (!is_after_sent) {
        ahead = after;
        is_after_sent = true;
      }
      f(pos - first, offset, n, ahead);
      pos += n;
    }
  }
};

// The largest of s[0, n) (-inf for none).
inline float max_of(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if TOKENMILL_AVX512
  __m512 vmax = _mm512_set1_ps(m);
  for (; i + kLanes <= n; i += kLanes) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + i));
  m = _mm512_reduce_max_ps(vmax);
#else
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, m);
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = s[i + l] > lanes[l] ? s[i + l] : lanes[l];
  for (int l = 0; l < kLanes; ++l) m = std::max(m, lanes[l]);
#endif
  for (; i < n; ++i) m = std::max(m, s[i]);
  return m;
}

// In place: scores -> exp(scores - max); returns {max, sum}.
inline std::pair<float, float> softmax_numerators(float* s, int64_t n) {
  const float m = max_of(s, n);
  float sum = 0.f;
  int64_t i = 0;
#if TOKENMILL_AVX512
  __m512 vsum = _mm512_setzero_ps();
  const __m512 vm = _mm512_set1_ps(m);
  for (; i + kLanes <= n; i += kLanes) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), vm));
    _mm512_storeu_ps(s + i, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  sum = _mm512_reduce_add_ps(vsum);
#else
  float lanes[kLanes] = {};
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      s[i + l] = exp_lane(s[i + l] - m);
      lanes[l] += s[i + l];
    }
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
#endif
  for (; i < n; ++i) {
    s[i] = exp_lane(s[i] - m);
    sum += s[i];
  }
  return {m, sum};
}

}  // namespace tokenmill::attention
