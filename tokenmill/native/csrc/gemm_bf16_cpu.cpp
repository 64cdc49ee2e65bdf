// bf16 matmul for any number of rows: y[M, N] = x[M, K] @ W[N, K]^T, with AVX512-BF16 where the
// variant has it (a portable loop over the same panels elsewhere, for correctness: callers
// use PyTorch's GEMM there, see has_avx512_bf16).
//
// The weight is packed once into "pair-interleaved" column panels so that one 512-bit load
// holds 16 output columns x 2 consecutive k values, exactly what vdpbf16ps multiplies against
// a broadcast pair of activations:
//
//     packed[nb, kp, c, j] = W[nb * 16 + c, 2 * kp + j]      nb < N/16, kp < K/2, c < 16, j < 2
//
// The micro-kernel keeps an MR x NR tile of accumulators (6 rows x 4 panels = 24 zmm) and
// streams the K dimension once per tile; no horizontal reductions, results rounded straight to
// bf16. Work is split over column panels on ATen's thread pool, so at one row (decode) each
// thread streams its share of the weight exactly once.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "gemm_tiles.h"
#include "kernels.h"
#include "simd.h"

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define TOKENMILL_GEMM 1
#else
#define TOKENMILL_GEMM 0
#endif

namespace tokenmill {
namespace {

using gemm::kPanel;

#if TOKENMILL_GEMM
struct Kernel {
  template <int MR, int NR>
  static void tile(const uint16_t* x, int64_t k_dim, const uint16_t* panels, int64_t panel_stride,
                   uint16_t* y, int64_t n_dim) {
    __m512 acc[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
    const int64_t num_pairs = k_dim / 2;
    for (int64_t kp = 0; kp < num_pairs; ++kp) {
      __m512bh w[NR];
      for (int j = 0; j < NR; ++j)
        w[j] = (__m512bh)_mm512_loadu_si512(panels + j * panel_stride + kp * 2 * kPanel);
      for (int m = 0; m < MR; ++m) {
        int32_t pair;
        std::memcpy(&pair, x + m * k_dim + 2 * kp, sizeof(pair));
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
        for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, w[j]);
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * n_dim + j * kPanel),
                            (__m256i)_mm512_cvtneps_pbh(acc[m][j]));
  }
};
#else
// The same tile with fp32 accumulators in memory, summed as vdpbf16ps sums (pairs of k).
struct Kernel {
  template <int MR, int NR>
  static void tile(const uint16_t* x, int64_t k_dim, const uint16_t* panels, int64_t panel_stride,
                   uint16_t* y, int64_t n_dim) {
    float acc[MR][NR][kPanel] = {};
    for (int64_t kp = 0; kp < k_dim / 2; ++kp)
      for (int m = 0; m < MR; ++m) {
        const float x0 = bf16_bits_to_float(x[m * k_dim + 2 * kp]);
        const float x1 = bf16_bits_to_float(x[m * k_dim + 2 * kp + 1]);
        for (int j = 0; j < NR; ++j) {
          const uint16_t* w = panels + j * panel_stride + kp * 2 * kPanel;
          for (int c = 0; c < kPanel; ++c)
            acc[m][j][c] += x0 * bf16_bits_to_float(w[2 * c]) + x1 * bf16_bits_to_float(w[2 * c + 1]);
        }
      }
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j)
        for (int c = 0; c < kPanel; ++c)
          y[m * n_dim + j * kPanel + c] = float_to_bf16_bits(acc[m][j][c]);
  }
};
#endif

// Greedy decoding's lm_head: each thread folds its bf16 tiles into a running (largest value,
// first column) per row, so the [M, vocabulary] logits never reach memory; the threads' answers
// are merged after. Values compare after rounding to bf16, exactly as an argmax over the bf16
// logits would; NaNs never win and ties go to the lowest column.
struct ArgmaxTiles {
  static constexpr int64_t kStride = gemm::kNR * kPanel;
  int64_t m_dim;
  std::vector<uint16_t> scratch;  // [thread][kMR][kStride]
  std::vector<float> best;        // [thread][m_dim]
  std::vector<int64_t> best_col;  // [thread][m_dim]

  ArgmaxTiles(int64_t m, int threads)
      : m_dim(m), scratch(threads * gemm::kMR * kStride),
        best(threads * m, -std::numeric_limits<float>::infinity()), best_col(threads * m, 0) {}

  uint16_t* tile(int64_t /*m0*/, int64_t /*p0*/, int64_t& stride) {
    stride = kStride;
    return scratch.data() + at::get_thread_num() * gemm::kMR * kStride;
  }

  void done(int64_t m0, int64_t rows, int64_t p0, int64_t np) {
    const int thread = at::get_thread_num();
    const uint16_t* t = scratch.data() + thread * gemm::kMR * kStride;
    float* b = best.data() + thread * m_dim;
    int64_t* col = best_col.data() + thread * m_dim;
    for (int64_t r = 0; r < rows; ++r, t += kStride) {
      // Strictly above the row's best so far: an equal value in a later tile is a later column.
      const auto [m, c] =
          tokenmill::max_above(reinterpret_cast<const c10::BFloat16*>(t), np * kPanel, b[m0 + r]);
      if (c >= 0) {
        b[m0 + r] = m;
        col[m0 + r] = p0 * kPanel + c;
      }
    }
  }
};

}  // namespace

bool has_avx512_bf16() { return TOKENMILL_GEMM == 1; }

at::Tensor pack_bf16_weight(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2, "bf16 [N, K] weight expected");
  const int64_t n_dim = w.size(0), k_dim = w.size(1);
  TORCH_CHECK(n_dim % kPanel == 0 && k_dim % 2 == 0, "N % 16 == 0 and K % 2 == 0 required");
  // [N, K] -> [N/16, 16, K/2, 2] -> [N/16, K/2, 16, 2]
  return w.contiguous().view({n_dim / kPanel, kPanel, k_dim / 2, 2}).permute({0, 2, 1, 3})
      .contiguous();
}

at::Tensor gemm_bf16_argmax(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              "contiguous bf16 x [M, K] expected");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kPanel && packed.is_contiguous(),
              "weight from pack_bf16_weight expected");
  const int64_t m_dim = x.size(0), k_dim = x.size(1), num_panels = packed.size(0);
  TORCH_CHECK(packed.size(1) * 2 == k_dim, "x and weight disagree on K");
  at::Tensor out = at::empty({m_dim}, x.options().dtype(at::kLong));
  const int threads = at::get_num_threads();
  ArgmaxTiles sink(m_dim, threads);
  gemm::packed_gemm_into<Kernel>(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
                                 m_dim, k_dim,
                                 reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()),
                                 num_panels, k_dim * kPanel, sink);
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t m = 0; m < m_dim; ++m) {
    float b = -std::numeric_limits<float>::infinity();
    int64_t col = 0;
    for (int t = 0; t < threads; ++t) {
      const float v = sink.best[t * m_dim + m];
      const int64_t c = sink.best_col[t * m_dim + m];
      if (v > b || (v == b && v > -std::numeric_limits<float>::infinity() && c < col)) {
        b = v;
        col = c;
      }
    }
    o[m] = col;
  }
  return out;
}

at::Tensor gemm_bf16_packed(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              "contiguous bf16 x [M, K] expected");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kPanel && packed.is_contiguous(),
              "weight from pack_bf16_weight expected");
  const int64_t m_dim = x.size(0), k_dim = x.size(1);
  const int64_t num_panels = packed.size(0), n_dim = num_panels * kPanel;
  TORCH_CHECK(packed.size(1) * 2 == k_dim, "x and weight disagree on K");
  at::Tensor y = at::empty({m_dim, n_dim}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t panel_stride = k_dim * kPanel;  // elements per panel
  gemm::packed_gemm<Kernel>(xp, m_dim, k_dim, wp, num_panels, panel_stride, yp);
  return y;
}

}  // namespace tokenmill
