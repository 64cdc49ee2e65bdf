// bf16 matmul on CPUs with AVX512-BF16, for any number of rows: y[M, N] = x[M, K] @ W[N, K]^T.
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

#include <torch/extension.h>

#include "gemm_tiles.h"
#include "kernels.h"

#include <cstdint>
#include <cstring>

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
#endif

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

at::Tensor gemm_bf16_packed(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
              "contiguous bf16 x [M, K] expected");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kPanel && packed.is_contiguous(),
              "weight from pack_bf16_weight expected");
  const int64_t m_dim = x.size(0), k_dim = x.size(1);
  const int64_t num_panels = packed.size(0), n_dim = num_panels * kPanel;
  TORCH_CHECK(packed.size(1) * 2 == k_dim, "x and weight disagree on K");
  at::Tensor y = at::empty({m_dim, n_dim}, x.options());
#if TOKENMILL_GEMM
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t panel_stride = k_dim * kPanel;  // elements per panel
  gemm::packed_gemm<Kernel>(xp, m_dim, k_dim, wp, num_panels, panel_stride, yp);
#else
  TORCH_CHECK(false, "built without AVX512-BF16");
#endif
  return y;
}

}  // namespace tokenmill
