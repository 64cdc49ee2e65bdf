// Matmul on quantized weights, y[M, N] = x[M, K] @ W^T, streaming the weight's own bytes.
//
// W is held as integers with a float scale, and optionally a min, per group of G consecutive k
// (G a multiple of 32): w = scale * q + min. Two widths:
//   4-bit: q in [0, 15], always with a min (GGUF Q4_0, Q4_1 and Q4_K and tokenmill's int4 all
//          map onto it exactly: Q4_0's min is -8 * scale);
//   8-bit: q in [-128, 127], stored as q + 128, with or without a min (Q8_0, Q5_0, Q6_K,
//          int8 per channel).
// The activations are quantized per block of 32 to int8 (quant_act.h), so each block's dot
// product is exact integer arithmetic: vpdpbusd multiplies 64 unsigned weight bytes by signed
// activation bytes, four k at a time, into 16 int32 column sums.
//
// Packed layout (tokenmill/quant/packing.py writes it): panels of 16 output columns; a panel
// holds its K/G groups one after the other, each group as
//   G/32 blocks of 32 k: 4-bit: 4 chunks of 64 bytes, chunk c byte (col * 4 + i) = the value
//                               at k = 8c + i (low nibble) and at k = 8c + 4 + i (high nibble);
//                        8-bit: 8 chunks of 64 bytes, chunk c byte (col * 4 + i) = k = 4c + i;
//   16 fp16 scales, then (with mins) 16 fp16 mins.
// One 64-byte load thus holds 16 columns x 4 k, exactly what one vpdpbusd consumes against a
// broadcast of 4 activation bytes; the 16 int32 sums of a block become floats once per block.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "kernels.h"
#include "quant_act.h"
#include "simd.h"

#include <c10/util/Half.h>

#include <cstring>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define TOKENMILL_VNNI 1
#else
#define TOKENMILL_VNNI 0
#endif

namespace tokenmill {
namespace {

using quant::kBlock;
using quant::QuantizedRows;
constexpr int64_t kPanel = 16;

struct Format {
  int bits;
  bool has_min;
  int64_t group;
  int64_t block_bytes() const { return bits == 4 ? 256 : 512; }
  int64_t scales_offset() const { return group / kBlock * block_bytes(); }
  int64_t group_bytes() const { return scales_offset() + (has_min ? 64 : 32); }
};

[[maybe_unused]] float half_to_float(const uint8_t* p) {
  c10::Half h;
  std::memcpy(&h, p, sizeof(h));
  return static_cast<float>(h);
}

#if TOKENMILL_VNNI
// One block of 32 k: the int32 dot products of MR activation rows with NR panels' columns.
template <int MR, int NR, int BITS>
inline __attribute__((always_inline)) void block_sums(const QuantizedRows& a, int64_t m0,
                                                      int64_t b, const uint8_t* bp,
                                                      int64_t panel_stride, __m512i (&isum)[MR][NR]) {
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) isum[m][j] = _mm512_setzero_si512();
  if constexpr (BITS == 4) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
      __m512i lo[NR], hi[NR];
      for (int j = 0; j < NR; ++j) {
        const __m512i raw = _mm512_loadu_si512(bp + j * panel_stride + c * 64);
        lo[j] = _mm512_and_si512(raw, low4);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
      }
      for (int m = 0; m < MR; ++m) {
        int32_t x0, x1;
        std::memcpy(&x0, a.q_row(m0 + m) + b * kBlock + 8 * c, 4);
        std::memcpy(&x1, a.q_row(m0 + m) + b * kBlock + 8 * c + 4, 4);
        const __m512i v0 = _mm512_set1_epi32(x0), v1 = _mm512_set1_epi32(x1);
        for (int j = 0; j < NR; ++j)
          isum[m][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(isum[m][j], lo[j], v0), hi[j], v1);
      }
    }
  } else {
    for (int c = 0; c < 8; ++c) {
      __m512i w[NR];
      for (int j = 0; j < NR; ++j) w[j] = _mm512_loadu_si512(bp + j * panel_stride + c * 64);
      for (int m = 0; m < MR; ++m) {
        int32_t x0;
        std::memcpy(&x0, a.q_row(m0 + m) + b * kBlock + 4 * c, 4);
        const __m512i v0 = _mm512_set1_epi32(x0);
        for (int j = 0; j < NR; ++j) isum[m][j] = _mm512_dpbusd_epi32(isum[m][j], w[j], v0);
      }
    }
    for (int m = 0; m < MR; ++m) {  // the weights' +128 offset times the block's activations
      const __m512i offset = _mm512_set1_epi32(128 * a.qsum_row(m0 + m)[b]);
      for (int j = 0; j < NR; ++j) isum[m][j] = _mm512_sub_epi32(isum[m][j], offset);
    }
  }
}

inline __m512 load_halves(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Rows m0.. (MR of them) x panels (NR of them) of y, in fp32, into out[MR][NR * 16].
template <int MR, int NR, int BITS, bool MIN>
void tile(const QuantizedRows& a, int64_t m0, const uint8_t* panels, int64_t panel_stride,
          const Format& f, float* out) {
  const int64_t groups = a.k_pad / f.group, per_group = f.group / kBlock;
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* gp = panels + g * f.group_bytes();
    __m512 scale[NR];
    for (int j = 0; j < NR; ++j) scale[j] = load_halves(gp + j * panel_stride + f.scales_offset());
    for (int64_t bb = 0; bb < per_group; ++bb) {
      const int64_t b = g * per_group + bb;
      __m512i isum[MR][NR];
      block_sums<MR, NR, BITS>(a, m0, b, gp + bb * f.block_bytes(), panel_stride, isum);
      for (int m = 0; m < MR; ++m) {
        const __m512 xd = _mm512_set1_ps(a.d_row(m0 + m)[b]);
        for (int j = 0; j < NR; ++j)
          acc[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[m][j]),
                                      _mm512_mul_ps(scale[j], xd), acc[m][j]);
      }
    }
    if constexpr (MIN) {
      for (int j = 0; j < NR; ++j) {
        const __m512 mn = load_halves(gp + j * panel_stride + f.scales_offset() + 32);
        for (int m = 0; m < MR; ++m)
          acc[m][j] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.gsum_row(m0 + m)[g]), acc[m][j]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(out + m * NR * kPanel + j * kPanel, acc[m][j]);
}
#else
// The same sums one column at a time: integer block sums, then the same float steps.
template <int MR, int NR, int BITS, bool MIN>
void tile(const QuantizedRows& a, int64_t m0, const uint8_t* panels, int64_t panel_stride,
          const Format& f, float* out) {
  const int64_t groups = a.k_pad / f.group, per_group = f.group / kBlock;
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j)
      for (int64_t col = 0; col < kPanel; ++col) {
        float acc = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          const uint8_t* gp = panels + j * panel_stride + g * f.group_bytes();
          const float scale = half_to_float(gp + f.scales_offset() + 2 * col);
          for (int64_t bb = 0; bb < per_group; ++bb) {
            const int64_t b = g * per_group + bb;
            const int8_t* xq = a.q_row(m0 + m) + b * kBlock;
            const uint8_t* bp = gp + bb * f.block_bytes();
            int32_t isum = 0;
            for (int64_t k = 0; k < kBlock; ++k) {
              const uint8_t* chunk = bp + (BITS == 4 ? k / 8 : k / 4) * 64 + col * 4;
              const int32_t w = BITS == 4 ? (chunk[k % 4] >> (k % 8 >= 4 ? 4 : 0)) & 0x0F
                                          : chunk[k % 4] - 128;
              isum += w * xq[k];
            }
            acc += static_cast<float>(isum) * (scale * a.d_row(m0 + m)[b]);
          }
          if (MIN) acc += half_to_float(gp + f.scales_offset() + 32 + 2 * col) * a.gsum_row(m0 + m)[g];
        }
        out[m * NR * kPanel + j * kPanel + col] = acc;
      }
}
#endif

template <int NR, int BITS, bool MIN>
void rows_tile(int64_t rows, const QuantizedRows& a, int64_t m0, const uint8_t* panels,
               int64_t panel_stride, const Format& f, float* out) {
  switch (rows) {
    case 1: tile<1, NR, BITS, MIN>(a, m0, panels, panel_stride, f, out); break;
    case 2: tile<2, NR, BITS, MIN>(a, m0, panels, panel_stride, f, out); break;
    case 3: tile<3, NR, BITS, MIN>(a, m0, panels, panel_stride, f, out); break;
    default: tile<4, NR, BITS, MIN>(a, m0, panels, panel_stride, f, out); break;
  }
}

template <typename OutT>
void store_tile(const float* t, int64_t rows, int64_t cols, int64_t t_stride, OutT* y,
                int64_t y_stride) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t c = 0; c < cols; ++c) y[m * y_stride + c] = static_cast<OutT>(t[m * t_stride + c]);
}

// Column tiles of NR panels (two at one row, where a thread's strip is streamed once, so
// four keep more sums in flight) x row chunks, split over ATen's threads.
template <int BITS, bool MIN, typename OutT>
void run(const QuantizedRows& a, const uint8_t* w, int64_t num_panels, const Format& f, OutT* y,
         int64_t n_dim) {
  constexpr int kMR = 4;
  const int64_t panel_stride = (a.k_pad / f.group) * f.group_bytes();
  const int64_t nr = a.rows == 1 ? 4 : 2;
  const int64_t num_tiles = (num_panels + nr - 1) / nr;
  const int64_t wanted = (8 * at::get_num_threads() + num_tiles - 1) / num_tiles;
  const int64_t row_chunks = std::max<int64_t>(1, std::min(wanted, a.rows / (4 * kMR)));
  const int64_t chunk_rows = ((a.rows + row_chunks - 1) / row_chunks + kMR - 1) / kMR * kMR;
  at::parallel_for(0, num_tiles * row_chunks, 1, [&](int64_t begin, int64_t end) {
    float out[kMR * 4 * kPanel];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / row_chunks, rc = item % row_chunks;
      const int64_t p0 = t * nr, np = std::min<int64_t>(nr, num_panels - p0);
      const uint8_t* panels = w + p0 * panel_stride;
      const int64_t m_end = std::min(a.rows, (rc + 1) * chunk_rows);
      for (int64_t m0 = rc * chunk_rows; m0 < m_end; m0 += kMR) {
        const int64_t rows = std::min<int64_t>(kMR, a.rows - m0);
        switch (np) {
          case 1: rows_tile<1, BITS, MIN>(rows, a, m0, panels, panel_stride, f, out); break;
          case 2: rows_tile<2, BITS, MIN>(rows, a, m0, panels, panel_stride, f, out); break;
          case 3: rows_tile<3, BITS, MIN>(rows, a, m0, panels, panel_stride, f, out); break;
          default: rows_tile<4, BITS, MIN>(rows, a, m0, panels, panel_stride, f, out); break;
        }
        const int64_t cols = std::min(np * kPanel, n_dim - p0 * kPanel);
        store_tile(out, rows, cols, np * kPanel, y + m0 * n_dim + p0 * kPanel, n_dim);
      }
    }
  });
}

template <typename OutT>
void dispatch(const QuantizedRows& a, const uint8_t* w, int64_t num_panels, const Format& f,
              OutT* y, int64_t n_dim) {
  if (f.bits == 4) return run<4, true>(a, w, num_panels, f, y, n_dim);
  if (f.has_min) return run<8, true>(a, w, num_panels, f, y, n_dim);
  run<8, false>(a, w, num_panels, f, y, n_dim);
}

}  // namespace

bool has_avx512_vnni() { return TOKENMILL_VNNI == 1; }

at::Tensor quant_gemm(const at::Tensor& x, const at::Tensor& packed, int64_t bits, bool has_min,
                      int64_t group, int64_t n_dim, int64_t act_bits) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "contiguous x [M, K] expected");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "bf16 or fp32 activations expected");
  TORCH_CHECK(bits == 4 || (bits == 8), "4- or 8-bit weights expected");
  TORCH_CHECK(bits == 8 || has_min, "4-bit weights carry a min");
  TORCH_CHECK(group > 0 && group % kBlock == 0, "group must be a multiple of 32");
  TORCH_CHECK(act_bits == 8 || act_bits == 16, "activations in 8 or 16 bits expected");
  const Format f{static_cast<int>(bits), has_min, group};
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.is_contiguous() &&
                  packed.size(2) == f.group_bytes(),
              "weight packed by tokenmill.quant.packing expected");
  const int64_t num_panels = packed.size(0), k_pad = packed.size(1) * group;
  const int64_t m_dim = x.size(0), k_dim = x.size(1);
  TORCH_CHECK(k_dim <= k_pad && k_pad - k_dim < group, "x and weight disagree on K");
  TORCH_CHECK(n_dim <= num_panels * kPanel && n_dim > (num_panels - 1) * kPanel,
              "n_dim does not match the weight's panels");
  QuantizedRows a;
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const int passes = static_cast<int>(act_bits / 8);
  if (x.scalar_type() == at::kBFloat16)
    quant::quantize_rows(x.data_ptr<at::BFloat16>(), m_dim, k_dim, k_pad, group, a, passes);
  else
    quant::quantize_rows(x.data_ptr<float>(), m_dim, k_dim, k_pad, group, a, passes);
  if (passes == 2) {  // rows 2m and 2m + 1 are x's two roundings: their products add up
    at::Tensor both = at::empty({2 * m_dim, n_dim}, x.options().dtype(at::kFloat));
    dispatch(a, w, num_panels, f, both.data_ptr<float>(), n_dim);
    return both.view({m_dim, 2, n_dim}).sum(1).to(x.scalar_type());
  }
  at::Tensor y = at::empty({m_dim, n_dim}, x.options());
  if (x.scalar_type() == at::kBFloat16)
    dispatch(a, w, num_panels, f, y.data_ptr<at::BFloat16>(), n_dim);
  else
    dispatch(a, w, num_panels, f, y.data_ptr<float>(), n_dim);
  return y;
}

}  // namespace tokenmill
