// Decode attention over the paged KV cache on the CPU, reading each request's K/V blocks in
// place (no gather copy, no padding to the longest request).
//
// One task per (request, context partition), all heads: the cache is read chunk by chunk,
// every KV head of a slot together, so each block streams front to back (and the next one is
// prefetched), once for the scores and once for the weighted sum of V.
// Positions go 16 at a time within a cache block (no division per position): the 16 partial
// dot products of a query head are summed across lanes by one transpose-and-add tree, so a
// score costs a few instructions instead of a full horizontal reduction. With AVX512-BF16 the
// bf16 scores use vdpbf16ps on the raw cache (no conversion); the weighted sum of V keeps its
// accumulators in registers (template on head_dim / 16).
//
// When there are too few requests to keep every thread busy (small batches,
// long contexts) the context is split into partitions whose partial results (max, sum,
// unnormalised output) are merged by log-sum-exp afterwards, as in flash-decoding.
//
//   q            [B, H, D]            float32 or bfloat16, D a multiple of 16
//   k/v cache    [NB, BS, Hkv, D]     same dtype as q
//   block_table  [B, MB] int64        seq_lens [B] int64
//   out          [B, H, D]            dtype of q

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "kernels.h"
#include "simd.h"

#if defined(__SSE__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kMaxDim = 256;
constexpr int64_t kChunk = 16;          // positions scored together
constexpr int64_t kMinPartition = 256;  // positions per partition, at least

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// Cache lines wanted soon (the next chunk), requested a share at a time while the current
// chunk computes. Requesting a whole chunk at once fills the core's miss slots and stalls the
// loads of the chunk being computed behind them; in shares, the misses stay in flight under
// the arithmetic (decode attention at batch 128 from DRAM: 0.48 -> 0.39 ms per layer).
struct Lookahead {
  const char* p = nullptr;
  int64_t bytes = 0;
  void fetch(int64_t share, int64_t shares) const {
#if defined(__SSE__)
    for (int64_t b = bytes * share / shares / 64 * 64; b < bytes * (share + 1) / shares; b += 64)
      _mm_prefetch(p + b, _MM_HINT_T0);
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
  int64_t row_bytes;  // one slot: all its KV heads' K (or V)

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
    return {reinterpret_cast<const char*>(base + offset), n * row_bytes};
  }

  // Calls f(offset from first, element offset of the chunk's first slot, n <= kChunk, ahead)
  // for each chunk in order; `ahead` holds the next chunk's lines (after the last chunk,
  // `after`: what the caller reads next), for f to prefetch a share at a time. Blocks lie
  // anywhere in the cache, so the hardware prefetchers cannot run ahead across them. The
  // first chunk is requested whole (a no-op when the previous pass already fetched it).
  template <typename F>
  void for_chunks(const T* base, F&& f, const Lookahead& after = {}) const {
    lines_of_chunk(base, first).fetch(0, 1);
    for (int64_t pos = first; pos < end;) {
      const auto [offset, n] = chunk_at(pos);
      const Lookahead ahead = pos + n < end ? lines_of_chunk(base, pos + n) : after;
      f(pos - first, offset, n, ahead);
      pos += n;
    }
  }
};

// In place: scores -> exp(scores - max); returns {max, sum}.
inline std::pair<float, float> softmax_numerators(float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if TOKENMILL_AVX512
  __m512 vmax = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + i));
  m = _mm512_reduce_max_ps(vmax);
#endif
  for (; i < n; ++i) m = std::max(m, s[i]);
  float sum = 0.f;
  i = 0;
#if TOKENMILL_AVX512
  __m512 vsum = _mm512_setzero_ps();
  const __m512 vm = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16) {
    __m512 e = tokenmill::exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), vm));
    _mm512_storeu_ps(s + i, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  sum = _mm512_reduce_add_ps(vsum);
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    sum += s[i];
  }
  return {m, sum};
}

#if TOKENMILL_AVX512

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
      for (int c = 0; c < D16; ++c) q[c] = tokenmill::load16(src + 16 * c);
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
    __m512 acc = _mm512_mul_ps(q[0], tokenmill::load16(k));
    for (int c = 1; c < D16; ++c) acc = _mm512_fmadd_ps(q[c], tokenmill::load16(k + 16 * c), acc);
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
      const __m512 vv = tokenmill::load16(v + 16 * c);
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

#else  // portable fallback

template <typename T, int D16>
void score_pass(const T* q, int64_t num_kv_heads, int64_t groups, float scale,
                const Span<T>& span, float* scores) {
  const int64_t n_total = span.end - span.first, dim = 16 * D16;
  span.for_chunks(span.k, [&](int64_t i0, int64_t offset, int64_t n, const Lookahead&) {
    for (int64_t h = 0; h < num_kv_heads * groups; ++h)
      for (int64_t i = 0; i < n; ++i) {
        const T* k = span.k + offset + i * span.slot_stride + (h / groups) * dim;
        float s = 0.f;
        for (int64_t d = 0; d < dim; ++d) s += to_float(q[h * dim + d]) * to_float(k[d]);
        scores[h * n_total + i0 + i] = s * scale;
      }
  });
}

template <typename T, int D16>
void value_pass(const float* probs, int64_t num_kv_heads, int64_t groups, const Span<T>& span,
                float* acc, const Lookahead&) {
  const int64_t n_total = span.end - span.first, dim = 16 * D16;
  std::fill(acc, acc + num_kv_heads * groups * dim, 0.f);
  span.for_chunks(span.v, [&](int64_t i0, int64_t offset, int64_t n, const Lookahead&) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < num_kv_heads * groups; ++h) {
        const T* v = span.v + offset + i * span.slot_stride + (h / groups) * dim;
        for (int64_t d = 0; d < dim; ++d)
          acc[h * dim + d] += probs[h * n_total + i0 + i] * to_float(v[d]);
      }
  });
}

#endif

template <typename T, int D16>
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                      int64_t window, at::Tensor& out) {
  constexpr int64_t dim = 16 * D16;
  const int64_t num_reqs = q.size(0), num_heads = q.size(1);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t groups = num_heads / num_kv_heads;
  const T* q_ptr = q.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();

  auto range = [&](int64_t b) {
    const int64_t len = lens[b];
    return std::make_pair(window > 0 ? std::max<int64_t>(0, len - window) : 0, len);
  };
  // Partitions: enough tasks for every thread (8 each), none shorter than kMinPartition.
  int64_t longest = 0;
  for (int64_t b = 0; b < num_reqs; ++b) {
    const auto [first, end] = range(b);
    longest = std::max(longest, end - first);
  }
  const int64_t wanted = (8 * at::get_num_threads() + num_reqs - 1) / num_reqs;
  const int64_t parts = std::max<int64_t>(1, std::min(wanted, longest / kMinPartition));
  const int64_t part_len = (longest + parts - 1) / parts;
  const int64_t slot_stride = num_kv_heads * dim;

  // Per (request, partition): unnormalised output [H, D], then max [H] and sum [H].
  const int64_t partial_size = num_heads * (dim + 2);
  std::vector<float> partial(parts > 1 ? num_reqs * parts * partial_size : 0);

  auto span_of = [&](int64_t task) {
    const int64_t b = task / parts, part = task % parts;
    const auto [req_first, req_end] = range(b);
    return Span<T>{k_cache.data_ptr<T>(), v_cache.data_ptr<T>(),
                   table + b * block_table.stride(0), block_size, k_cache.stride(0),
                   slot_stride, std::min(req_end, req_first + part * part_len),
                   std::min(req_end, req_first + (part + 1) * part_len),
                   static_cast<int64_t>(slot_stride * sizeof(T))};
  };
  at::parallel_for(0, num_reqs * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(num_heads * dim), maxes(num_heads), sums(num_heads);
    for (int64_t task = begin; task < end; ++task) {
      const Span<T> span = span_of(task);
      const int64_t b = task / parts;
      // While this task's V streams, the next task's first K chunk is fetched too.
      Lookahead next;
      if (task + 1 < end) {
        const Span<T> following = span_of(task + 1);
        next = following.lines_of_chunk(following.k, following.first);
      }
      const int64_t n = span.end - span.first;
      if (n == 0) {
        std::fill(acc.begin(), acc.end(), 0.f);
        std::fill(maxes.begin(), maxes.end(), -std::numeric_limits<float>::infinity());
        std::fill(sums.begin(), sums.end(), 0.f);
      } else {
        scores.resize(num_heads * n);
        score_pass<T, D16>(q_ptr + b * num_heads * dim, num_kv_heads, groups,
                           static_cast<float>(scale), span, scores.data());
        for (int64_t h = 0; h < num_heads; ++h)
          std::tie(maxes[h], sums[h]) = softmax_numerators(&scores[h * n], n);
        value_pass<T, D16>(scores.data(), num_kv_heads, groups, span, acc.data(), next);
      }
      if (parts == 1) {
        for (int64_t h = 0; h < num_heads; ++h) {
          T* dst = out_ptr + (b * num_heads + h) * dim;
          const float inv = sums[h] > 0.f ? 1.f / sums[h] : 0.f;
          for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(acc[h * dim + d] * inv);
        }
      } else {
        float* dst = partial.data() + task * partial_size;
        std::copy(acc.begin(), acc.end(), dst);
        std::copy(maxes.begin(), maxes.end(), dst + num_heads * dim);
        std::copy(sums.begin(), sums.end(), dst + num_heads * (dim + 1));
      }
    }
  });
  if (parts == 1) return;

  // Merge each request's partitions: rescale every partial result to the largest max.
  at::parallel_for(0, num_reqs * num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_heads, h = task % num_heads;
      const float* base = partial.data() + b * parts * partial_size;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t p = 0; p < parts; ++p)
        m = std::max(m, base[p * partial_size + num_heads * dim + h]);
      float total = 0.f;
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t p = 0; p < parts; ++p) {
        const float* part = base + p * partial_size;
        const float sum = part[num_heads * (dim + 1) + h];
        if (sum == 0.f) continue;
        const float w = std::exp(part[num_heads * dim + h] - m);
        total += sum * w;
        for (int64_t d = 0; d < dim; ++d) merged[d] += part[h * dim + d] * w;
      }
      T* dst = out_ptr + task * dim;
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(merged[d] * inv);
    }
  });
}

template <typename T, int D16 = 1>
void dispatch_dim(int64_t dim16, const at::Tensor& q, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& block_table,
                  const at::Tensor& seq_lens, double scale, int64_t window, at::Tensor& out) {
  if constexpr (D16 <= kMaxDim / 16) {
    if (dim16 == D16) {
      decode_attention<T, D16>(q, k_cache, v_cache, block_table, seq_lens, scale, window, out);
    } else {
      dispatch_dim<T, D16 + 1>(dim16, q, k_cache, v_cache, block_table, seq_lens, scale, window,
                               out);
    }
  }
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
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of KV heads");
  at::Tensor out = at::empty_like(q);
  const int64_t dim16 = q.size(2) / 16;
  if (q.scalar_type() == at::kFloat) {
    dispatch_dim<float>(dim16, q, k_cache, v_cache, block_table, seq_lens, scale, window, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    dispatch_dim<c10::BFloat16>(dim16, q, k_cache, v_cache, block_table, seq_lens, scale, window,
                                out);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16");
  }
  return out;
}

}  // namespace tokenmill
