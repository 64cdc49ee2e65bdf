// Quantizing new K/V into a slot of an int8 or fp8 (e4m3) KV cache. Per KV head the scale is
// max|x| / qmax rounded to bf16, and each element x / scale rounded: int8 to the nearest
// (ties to even) within +-127; fp8 clamped to +-448, then to the nearest e4m3. The arithmetic
// of tokenmill/attention/kv_quant.py, so both write the same bytes. Layouts: the scales
// [NB, Hkv, BS]; V slot-major [NB, BS, Hkv, D]; K slot-major for fp8, dim-pair-major within
// each block for int8 (paged_attention_paired.h).
//
// A caller holding one token's K and V rows [Hkv, D] and its cache slot writes them with
//   store_token(k_row, v_row, num_kv_heads, dim, block_size, slot,
//               k_cache, v_cache, k_scales, v_scales);
// (caches int8_t or Fp8, scales c10::BFloat16, all contiguous).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "paged_attention.h"

namespace tokenmill::attention {

template <typename C>
constexpr float kQuantMax = std::is_same_v<C, int8_t> ? 127.f : 448.f;

inline void store_quantized(float y, int8_t* dst) {
  *dst = static_cast<int8_t>(std::nearbyint(std::clamp(y, -127.f, 127.f)));
}
inline void store_quantized(float y, Fp8* dst) { *dst = Fp8(std::clamp(y, -448.f, 448.f)); }

// x [dim] -> its scale, and element d at dst[(d / 2) * pair_stride + d % 2] (pair_stride 2:
// contiguous).
template <typename T, typename C>
void quantize_row(const T* x, int64_t dim, C* dst, int64_t pair_stride, c10::BFloat16* scale) {
  float amax = 0.f;
  for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::abs(to_float(x[d])));
  *scale = c10::BFloat16(amax / kQuantMax<C>);
  const float s = static_cast<float>(*scale);
  const float divisor = s > 0.f ? s : 1.f;  // all zeros: stored as zeros
  for (int64_t d = 0; d < dim; ++d)
    store_quantized(to_float(x[d]) / divisor, dst + (d / 2) * pair_stride + d % 2);
}

// One token's K and V rows [Hkv, D] (float or c10::BFloat16) into cache slot `slot`.
template <typename T, typename C>
void store_token(const T* k, const T* v, int64_t num_kv_heads, int64_t dim, int64_t block_size,
                 int64_t slot, C* k_cache, C* v_cache, c10::BFloat16* k_scales,
                 c10::BFloat16* v_scales) {
  const int64_t block = slot / block_size, in_block = slot % block_size;
  const int64_t block_stride = block_size * num_kv_heads * dim;
  constexpr bool kPaired = std::is_same_v<C, int8_t>;
  for (int64_t h = 0; h < num_kv_heads; ++h) {
    const int64_t scale_idx = (block * num_kv_heads + h) * block_size + in_block;
    const int64_t slot_major = slot * num_kv_heads * dim + h * dim;
    const int64_t k_offset =
        kPaired ? block * block_stride + h * block_size * dim + 2 * in_block : slot_major;
    quantize_row(k + h * dim, dim, k_cache + k_offset, kPaired ? 2 * block_size : 2,
                 k_scales + scale_idx);
    quantize_row(v + h * dim, dim, v_cache + slot_major, 2, v_scales + scale_idx);
  }
}

}  // namespace tokenmill::attention
