// The tasks of decode attention: one per (request, context partition), on ATen's thread pool;
// then, where a context was split, the merge of its partitions. Included by the per-dtype
// translation units (paged_attention_{f32,bf16,int8,fp8}.cpp), which instantiate it.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "paged_attention.h"
#include "paged_attention_avx512.h"
#include "paged_attention_paired.h"
#include "paged_attention_portable.h"
#include "paged_attention_quant.h"
#include "paged_attention_vnni.h"

namespace tokenmill::attention {

// Head dims (/ 16) with passes specialised at compile time; any other runs the generic
// passes (D16 == 0). Each one is two more instantiations of every pass, so only the head
// dims of common models: 32, 64, 80, 96, 128, 256.
constexpr int kSpecialisedDims16[] = {2, 4, 5, 6, 8, 16};

// The weighted sum of V over an int8 cache of head dims in whole 32-dim groups takes integer
// products where the CPU has AVX512-VNNI (paged_attention_vnni.h); others, and fp8, widen to fp32.
template <typename C, int D16>
constexpr bool kVnni = std::is_same_v<C, int8_t> && D16 > 0 && D16 % 2 == 0;

template <typename Q, typename C, int D16>
void score_pass(const Q* q, int64_t num_kv_heads, int64_t groups, float scale,
                const Span<C>& span, float* scores) {
  if constexpr (std::is_same_v<C, int8_t>) {  // dim-pair-major K: no transposes
#if TOKENMILL_VNNI_ATTENTION
    return vnni::score_pass<Q, D16>(q, num_kv_heads, groups, scale, span, scores);
#elif TOKENMILL_AVX512
    return avx512::score_pass_paired<Q, D16>(q, num_kv_heads, groups, scale, span, scores);
#endif
    portable::score_pass_paired<Q, D16>(q, num_kv_heads, groups, scale, span, scores);
  } else if constexpr (kQuantized<C>) {
#if TOKENMILL_AVX512
    if constexpr (D16 > 0) return avx512::score_pass_quant<Q, C, D16>(q, num_kv_heads, groups, scale, span, scores);
#endif
    portable::score_pass_quant<Q, C, D16>(q, num_kv_heads, groups, scale, span, scores);
  } else {
#if TOKENMILL_AVX512
    if constexpr (D16 > 0) return avx512::score_pass<Q, D16>(q, num_kv_heads, groups, scale, span, scores);
#endif
    portable::score_pass<Q, D16>(q, num_kv_heads, groups, scale, span, scores);
  }
}

template <typename C, int D16>
void value_pass(const float* probs, int64_t num_kv_heads, int64_t groups, const Span<C>& span,
                float* acc, const Lookahead& after) {
  if constexpr (kQuantized<C>) {
#if TOKENMILL_VNNI_ATTENTION
    if constexpr (kVnni<C, D16>) return vnni::value_pass<D16>(probs, num_kv_heads, groups, span, acc, after);
#endif
#if TOKENMILL_AVX512
    if constexpr (D16 > 0) return avx512::value_pass_quant<C, D16>(probs, num_kv_heads, groups, span, acc, after);
#endif
    portable::value_pass_quant<C, D16>(probs, num_kv_heads, groups, span, acc, after);
  } else {
#if TOKENMILL_AVX512
    if constexpr (D16 > 0) return avx512::value_pass<C, D16>(probs, num_kv_heads, groups, span, acc, after);
#endif
    portable::value_pass<C, D16>(probs, num_kv_heads, groups, span, acc, after);
  }
}

// Partitions: enough tasks for every thread (8 each), none shorter than kMinPartition.
struct Partitions {
  int64_t parts, part_len;

  static Partitions plan(const DecodeProblem& p) {
    int64_t longest = 0;
    for (int64_t b = 0; b < p.num_reqs; ++b) {
      const auto [first, end] = p.range(b);
      longest = std::max(longest, end - first);
    }
    const int64_t wanted = (8 * at::get_num_threads() + p.num_reqs - 1) / p.num_reqs;
    const int64_t parts = std::max<int64_t>(1, std::min(wanted, longest / kMinPartition));
    return {parts, (longest + parts - 1) / parts};
  }
};

// One task's unnormalised result: acc [H, D], maxes [H], sums [H]; scores [H, n] scratch.
struct TaskResult {
  std::vector<float> scores, acc, maxes, sums;

  TaskResult(int64_t num_heads, int64_t dim)
      : acc(num_heads * dim), maxes(num_heads), sums(num_heads) {}

  void clear() {
    std::fill(acc.begin(), acc.end(), 0.f);
    std::fill(maxes.begin(), maxes.end(), -std::numeric_limits<float>::infinity());
    std::fill(sums.begin(), sums.end(), 0.f);
  }

  // The per-(request, partition) record merged later: acc, then maxes, then sums.
  void store_partial(float* dst) const {
    dst = std::copy(acc.begin(), acc.end(), dst);
    dst = std::copy(maxes.begin(), maxes.end(), dst);
    std::copy(sums.begin(), sums.end(), dst);
  }

  template <typename T>
  void store_normalised(int64_t dim, T* dst) const {
    for (size_t h = 0; h < sums.size(); ++h) {
      const float inv = sums[h] > 0.f ? 1.f / sums[h] : 0.f;
      for (int64_t d = 0; d < dim; ++d) dst[h * dim + d] = static_cast<T>(acc[h * dim + d] * inv);
    }
  }
};

template <typename Q, typename C, int D16>
void attend(const DecodeProblem& p, const Q* q, const Span<C>& span, const Lookahead& next,
            TaskResult& r) {
  const int64_t n = span.end - span.first;
  if (n == 0) return r.clear();
  r.scores.resize(p.num_heads * n);
  score_pass<Q, C, D16>(q, p.num_kv_heads, p.groups(), p.scale, span, r.scores.data());
  for (int64_t h = 0; h < p.num_heads; ++h)
    std::tie(r.maxes[h], r.sums[h]) = softmax_numerators(&r.scores[h * n], n);
  value_pass<C, D16>(r.scores.data(), p.num_kv_heads, p.groups(), span, r.acc.data(), next);
}

// Each request's partitions merged: every partial result rescaled to the largest max.
template <typename T>
void merge_partitions(const DecodeProblem& p, int64_t parts, const std::vector<float>& partial,
                      T* out) {
  const int64_t dim = p.dim, heads = p.num_heads, partial_size = heads * (dim + 2);
  at::parallel_for(0, p.num_reqs * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const float* base = partial.data() + b * parts * partial_size;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t part = 0; part < parts; ++part)
        m = std::max(m, base[part * partial_size + heads * dim + h]);
      float total = 0.f;
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t part = 0; part < parts; ++part) {
        const float* record = base + part * partial_size;
        const float sum = record[heads * (dim + 1) + h];
        if (sum == 0.f) continue;
        const float w = std::exp(record[heads * dim + h] - m);
        total += sum * w;
        for (int64_t d = 0; d < dim; ++d) merged[d] += record[h * dim + d] * w;
      }
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t d = 0; d < dim; ++d) out[task * dim + d] = static_cast<T>(merged[d] * inv);
    }
  });
}

template <typename Q, typename C, int D16>
void decode_attention_dim(const DecodeProblem& p, const Q* q, const C* k_cache, const C* v_cache,
                          Q* out) {
  const auto [parts, part_len] = Partitions::plan(p);
  const int64_t dim = p.dim, slot_stride = p.num_kv_heads * dim;
  // Per (request, partition): unnormalised output [H, D], then max [H] and sum [H].
  const int64_t partial_size = p.num_heads * (dim + 2);
  std::vector<float> partial(parts > 1 ? p.num_reqs * parts * partial_size : 0);
  auto span_of = [&](int64_t task) {
    const int64_t b = task / parts, part = task % parts;
    const auto [first, end] = p.range(b);
    return Span<C>{k_cache, v_cache, p.table + b * p.table_stride, p.block_size,
                   p.block_stride, slot_stride, std::min(end, first + part * part_len),
                   std::min(end, first + (part + 1) * part_len), dim,
                   static_cast<int64_t>(slot_stride * sizeof(C)), p.k_scales, p.v_scales,
                   std::is_same_v<C, int8_t>};
  };
  at::parallel_for(0, p.num_reqs * parts, 1, [&](int64_t begin, int64_t end) {
    TaskResult result(p.num_heads, dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / parts;
      // While this task's V streams, the next task's first K chunk is fetched too.
      Lookahead next;
      if (task + 1 < end) {
        const Span<C> following = span_of(task + 1);
        next = following.lines_of_chunk(following.k, following.first);
      }
      attend<Q, C, D16>(p, q + b * p.num_heads * dim, span_of(task), next, result);
      if (parts == 1) result.store_normalised(dim, out + b * p.num_heads * dim);
      else result.store_partial(partial.data() + task * partial_size);
    }
  });
  if (parts > 1) merge_partitions(p, parts, partial, out);
}

template <typename Q, typename C, size_t I = 0>
void dispatch_dim(const DecodeProblem& p, const Q* q, const C* k_cache, const C* v_cache, Q* out) {
  constexpr size_t kNum = sizeof(kSpecialisedDims16) / sizeof(kSpecialisedDims16[0]);
  if constexpr (I < kNum) {
    constexpr int kD16 = kSpecialisedDims16[I];
    if (p.dim == kLanes * kD16) return decode_attention_dim<Q, C, kD16>(p, q, k_cache, v_cache, out);
    return dispatch_dim<Q, C, I + 1>(p, q, k_cache, v_cache, out);
  } else {
    decode_attention_dim<Q, C, 0>(p, q, k_cache, v_cache, out);
  }
}

template <typename Q, typename C>
void decode_attention(const DecodeProblem& p, const Q* q, const C* k_cache, const C* v_cache,
                      Q* out) {
  dispatch_dim<Q, C>(p, q, k_cache, v_cache, out);
}

}  // namespace tokenmill::attention
