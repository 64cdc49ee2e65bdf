// Activations quantized for the integer dot products of quant_gemm_cpu.cpp: each row of x is
// cut into blocks of 32 values, and each block is stored as int8 q = round(x * 127 / amax) with
// its scale d = amax / 127 (so x ~= d * q), as llama.cpp's Q8 activations are. Kept beside
// them: the sum of each block's q (the 8-bit weights are stored offset by +128, and this sum
// takes the offset back out) and the sum of the rounded activations d * q over each weight
// group (the term a weight group's min multiplies). The min must see the same rounded x as the
// integer part: then a weight w = scale * q + min errs by w * (x' - x). With the exact sum of x
// it would err by (w - min) * (x' - x), about twice that for 4-bit weights whose min sits near
// -8 scales (2.1% against 0.9% relative error per layer of the bundled model).
//
// A block holding a NaN or an infinity gets d = NaN and q = 0, so its row's outputs are NaN,
// as a float matmul's would be non-finite. tokenmill/quant/reference.py computes the same
// numbers in PyTorch (same scale, same rounding: nearest, ties to even).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "simd.h"

namespace tokenmill::quant {

constexpr int64_t kBlock = 32;  // activation values per scale

struct QuantizedRows {
  int64_t rows = 0, k_pad = 0, group = 0;
  std::vector<int8_t> q;      // [rows, k_pad]
  std::vector<float> d;       // [rows, k_pad / 32]
  std::vector<int32_t> qsum;  // [rows, k_pad / 32]
  std::vector<float> gsum;    // [rows, k_pad / group]

  const int8_t* q_row(int64_t m) const { return q.data() + m * k_pad; }
  const float* d_row(int64_t m) const { return d.data() + m * (k_pad / kBlock); }
  const int32_t* qsum_row(int64_t m) const { return qsum.data() + m * (k_pad / kBlock); }
  const float* gsum_row(int64_t m) const { return gsum.data() + m * (k_pad / group); }
};

// One block of n <= 32 values (the rest of the block is zero).
template <typename T>
inline void quantize_block(const T* x, int64_t n, int8_t* q, float* d, int32_t* qsum,
                           float* sum) {
  float v[kBlock] = {};
  for (int64_t i = 0; i < n; ++i) v[i] = to_float(x[i]);
  float amax = 0.f;
  bool finite = true;
  for (int64_t i = 0; i < kBlock; ++i) {
    finite &= std::isfinite(v[i]);
    amax = std::max(amax, std::fabs(v[i]));
  }
  if (!finite) {
    *d = std::numeric_limits<float>::quiet_NaN();
    *qsum = 0;
    *sum = std::numeric_limits<float>::quiet_NaN();
    for (int64_t i = 0; i < kBlock; ++i) q[i] = 0;
    return;
  }
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  *d = amax / 127.f;
  int32_t total = 0;
  for (int64_t i = 0; i < kBlock; ++i) {
    q[i] = static_cast<int8_t>(std::nearbyint(v[i] * inv));
    total += q[i];
  }
  *qsum = total;
  *sum += *d * static_cast<float>(total);
}

// x [rows, k] (row stride k) -> blocks; k_pad is k rounded up to the weight's group size.
// passes 2: each row becomes two, x's rounding and then the rounding of what that left
// (x - d * q, at most d / 2 per value, so its own scale is ~254x finer): the two rows' products
// summed are x at ~15 bits, for the price of a second integer dot product per weight byte
// streamed (quant_gemm's act_bits 16).
template <typename T>
inline void quantize_rows(const T* x, int64_t rows, int64_t k, int64_t k_pad, int64_t group,
                          QuantizedRows& out, int passes = 1) {
  out.rows = rows * passes, out.k_pad = k_pad, out.group = group;
  const int64_t blocks = k_pad / kBlock, per_group = group / kBlock, groups = k_pad / group;
  out.q.assign(out.rows * k_pad, 0);
  out.d.assign(out.rows * blocks, 0.f);
  out.qsum.assign(out.rows * blocks, 0);
  out.gsum.assign(out.rows * groups, 0.f);
  auto block_of = [&](auto* values, int64_t n, int64_t row, int64_t b) {
    quantize_block(values, n, out.q.data() + row * k_pad + b * kBlock,
                   out.d.data() + row * blocks + b, out.qsum.data() + row * blocks + b,
                   out.gsum.data() + row * groups + b / per_group);
  };
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k0 = b * kBlock, row = m * passes;
        const int64_t n = std::max<int64_t>(0, std::min(kBlock, k - k0));
        block_of(x + m * k + k0, n, row, b);
        if (passes == 1) continue;
        const float d = out.d[row * blocks + b];
        const int8_t* q = out.q.data() + row * k_pad + k0;
        float rest[kBlock] = {};
        for (int64_t i = 0; i < n; ++i) rest[i] = to_float(x[m * k + k0 + i]) - d * q[i];
        block_of(static_cast<const float*>(rest), n, row + 1, b);
      }
  });
}

}  // namespace tokenmill::quant
