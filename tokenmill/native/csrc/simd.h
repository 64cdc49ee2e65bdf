// Small helpers shared by the CPU kernels: 16-lane loads and stores of fp32 or bf16, exp, and
// the first position of a row's largest value.
//
// Every kernel has an AVX-512 path (the native variant on CPUs that have it) and a portable
// one (the portable variant, -march=x86-64-v3 or plain -O3 on ARM): plain loops over kLanes
// independent lanes, which the compiler vectorises without reordering any sum.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#define TOKENMILL_AVX512 1
#else
#define TOKENMILL_AVX512 0
#endif

namespace tokenmill {

constexpr int kLanes = 16;

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
}

// Round to nearest even, as c10::BFloat16 does.
inline uint16_t float_to_bf16_bits(float f) { return c10::BFloat16(f).x; }

// exp(x) as exp16 computes it, one lane at a time, in arithmetic a compiler vectorises (the
// rounding by adding and subtracting 1.5 * 2^23, the power of two built in the exponent bits).
inline float exp_lane(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float f = (t - n) * 0.69314718055994531f;
  float p = 1.0f / 720;
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if TOKENMILL_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  // bf16 -> fp32 is a 16-bit left shift of the bit pattern.
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// fp32 -> bf16, round to nearest even (NaN inputs are not expected here).
inline void store16(c10::BFloat16* p, __m512 v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
#else
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
#endif
}

// exp(x), x clamped to [-87, 88], relative error ~2e-7: 2^(x*log2e) split into an
// integer power (exponent bits) and a degree-6 polynomial on [-0.5, 0.5].
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

// {largest value, its first position} of x[0, n) (fp32 or bf16) when that value exceeds
// `above`; {above, -1} when none does (the position pass is then skipped). Two passes,
// 16 lanes at a time; NaNs never win (a comparison with a NaN is false).
template <typename T>
inline std::pair<float, int64_t> max_above(
    const T* x, int64_t n, float above = -std::numeric_limits<float>::infinity()) {
  float m = above;
  int64_t i = 0;
#if TOKENMILL_AVX512
  __m512 vm = _mm512_set1_ps(m);
  for (; i + kLanes <= n; i += kLanes) vm = _mm512_max_ps(load16(x + i), vm);  // NaN: keeps vm
  m = _mm512_reduce_max_ps(vm);
#else
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, m);
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float v = to_float(x[i + l]);
      lanes[l] = v > lanes[l] ? v : lanes[l];
    }
  for (int l = 0; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
#endif
  for (; i < n; ++i) {
    const float v = to_float(x[i]);
    if (v > m) m = v;
  }
  if (!(m > above)) return {above, -1};
  for (i = 0; i + kLanes <= n; i += kLanes) {
#if TOKENMILL_AVX512
    const __mmask16 hit = _mm512_cmpeq_ps_mask(load16(x + i), _mm512_set1_ps(m));
    if (hit) return {m, i + __builtin_ctz(hit)};
#else
    bool any = false;
    for (int l = 0; l < kLanes; ++l) any |= to_float(x[i + l]) == m;
    if (any) break;
#endif
  }
  for (; i < n; ++i)
    if (to_float(x[i]) == m) return {m, i};
  return {above, -1};  // not reached: m is one of the entries
}

// max_above over the entries a bitmask allows: bit (i & 31) of allowed[i >> 5] is entry i
// (a grammar engine's token bitmask); entries past 32 * num_words are not allowed. Chunks of
// 16 entries with no allowed bit are not read. {above, -1} when no allowed entry exceeds
// `above`; NaNs never win.
template <typename T>
inline std::pair<float, int64_t> masked_max_above(
    const T* x, int64_t n, const uint32_t* allowed, int64_t num_words,
    float above = -std::numeric_limits<float>::infinity()) {
  n = std::min(n, 32 * num_words);
  const auto is_allowed = [&](int64_t i) { return (allowed[i >> 5] >> (i & 31)) & 1u; };
  // The 16 bits of entries [i, i + 16), i a multiple of 16.
  const auto chunk_bits = [&](int64_t i) {
    return static_cast<uint16_t>(allowed[i >> 5] >> (i & 31));
  };
  float m = above;
  int64_t i = 0;
#if TOKENMILL_AVX512
  __m512 vm = _mm512_set1_ps(m);
  for (; i + kLanes <= n; i += kLanes) {
    const __mmask16 k = chunk_bits(i);
    if (k) vm = _mm512_mask_max_ps(vm, k, load16(x + i), vm);  // NaN: keeps vm
  }
  m = _mm512_reduce_max_ps(vm);
#else
  for (; i + kLanes <= n; i += kLanes) {
    const uint16_t k = chunk_bits(i);
    for (int l = 0; k && l < kLanes; ++l) {
      const float v = to_float(x[i + l]);
      if (((k >> l) & 1u) && v > m) m = v;
    }
  }
#endif
  for (; i < n; ++i) {
    const float v = to_float(x[i]);
    if (is_allowed(i) && v > m) m = v;
  }
  if (!(m > above)) return {above, -1};
  for (i = 0; i + kLanes <= n; i += kLanes) {
    const uint16_t k = chunk_bits(i);
    if (!k) continue;
#if TOKENMILL_AVX512
    const __mmask16 hit = _mm512_mask_cmpeq_ps_mask(k, load16(x + i), _mm512_set1_ps(m));
    if (hit) return {m, i + __builtin_ctz(hit)};
#else
    for (int l = 0; l < kLanes; ++l)
      if (((k >> l) & 1u) && to_float(x[i + l]) == m) return {m, i + l};
#endif
  }
  for (; i < n; ++i)
    if (is_allowed(i) && to_float(x[i]) == m) return {m, i};
  return {above, -1};  // not reached: m is one of the allowed entries
}

}  // namespace tokenmill
