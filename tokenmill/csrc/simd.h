// Small helpers shared by the CPU kernels: 16-lane loads and stores of fp32 or bf16, exp, and
// the first position of a row's largest value.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <limits>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#define TOKENMILL_AVX512 1
#else
#define TOKENMILL_AVX512 0
#endif

namespace tokenmill {

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
// vectorised where AVX-512 is; NaNs never win.
template <typename T>
inline std::pair<float, int64_t> max_above(
    const T* x, int64_t n, float above = -std::numeric_limits<float>::infinity()) {
  float m = above;
  int64_t i = 0;
#if TOKENMILL_AVX512
  __m512 vm = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16) vm = _mm512_max_ps(load16(x + i), vm);  // NaN in x: keeps vm
  m = _mm512_reduce_max_ps(vm);
#endif
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (v > m) m = v;  // false for a NaN
  }
  if (!(m > above)) return {above, -1};
  i = 0;
#if TOKENMILL_AVX512
  const __m512 target = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16) {
    const __mmask16 hit = _mm512_cmpeq_ps_mask(load16(x + i), target);
    if (hit) return {m, i + __builtin_ctz(hit)};
  }
#endif
  for (; i < n; ++i)
    if (static_cast<float>(x[i]) == m) return {m, i};
  return {above, -1};  // not reached: m is one of the entries
}

}  // namespace tokenmill
