// fp32 matmul for few rows: y[M, N] = x[M, K] @ W[N, K]^T, with AVX-512 where the variant has it
// (a portable loop over the same panels elsewhere, for correctness: callers use PyTorch's
// GEMM there, see has_avx512f).
//
// Library SGEMM repacks the weight on every call; at decode sizes (a handful of rows against a
// weight that is streamed from memory once) that copy costs more than the arithmetic, and a
// 4-row product takes three times as long as a 1-row one. Here the weight is packed once into
// 16-column panels, each k-major:
//
//     packed[nb, k, c] = W[nb * 16 + c, k]      nb < N/16, k < K, c < 16
//
// so one 512-bit load holds 16 output columns at one k, multiplied against a broadcast
// activation. The micro-kernel keeps a 6 x 4-panel tile of accumulators (24 zmm) and streams K
// once per tile; threads split the column panels, so each streams its share of the weight once.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "gemm_tiles.h"
#include "kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define TOKENMILL_GEMM_F32 1
#else
#define TOKENMILL_GEMM_F32 0
#endif

namespace tokenmill {
namespace {

using gemm::kPanel;

#if TOKENMILL_GEMM_F32
struct Kernel {
  template <int MR, int NR>
  static void tile(const float* x, int64_t k_dim, const float* panels, int64_t panel_stride,
                   float* y, int64_t n_dim) {
    __m512 acc[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_dim; ++k) {
      __m512 w[NR];
      for (int j = 0; j < NR; ++j) w[j] = _mm512_loadu_ps(panels + j * panel_stride + k * kPanel);
      for (int m = 0; m < MR; ++m) {
        const __m512 xb = _mm512_set1_ps(x[m * k_dim + k]);
        for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_fmadd_ps(xb, w[j], acc[m][j]);
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) _mm512_storeu_ps(y + m * n_dim + j * kPanel, acc[m][j]);
  }
};
#else
struct Kernel {
  template <int MR, int NR>
  static void tile(const float* x, int64_t k_dim, const float* panels, int64_t panel_stride,
                   float* y, int64_t n_dim) {
    float acc[MR][NR][kPanel] = {};
    for (int64_t k = 0; k < k_dim; ++k)
      for (int m = 0; m < MR; ++m) {
        const float xb = x[m * k_dim + k];
        for (int j = 0; j < NR; ++j)
          for (int c = 0; c < kPanel; ++c)
            acc[m][j][c] += xb * panels[j * panel_stride + k * kPanel + c];
      }
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j)
        for (int c = 0; c < kPanel; ++c) y[m * n_dim + j * kPanel + c] = acc[m][j][c];
  }
};
#endif

}  // namespace

bool has_avx512f() { return TOKENMILL_GEMM_F32 == 1; }

at::Tensor pack_f32_weight(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2, "fp32 [N, K] weight expected");
  const int64_t n_dim = w.size(0), k_dim = w.size(1);
  TORCH_CHECK(n_dim % kPanel == 0, "N % 16 == 0 required");
  // [N, K] -> [N/16, 16, K] -> [N/16, K, 16]
  return w.contiguous().view({n_dim / kPanel, kPanel, k_dim}).permute({0, 2, 1}).contiguous();
}

at::Tensor gemm_f32_packed(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "contiguous fp32 x [M, K] expected");
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.dim() == 3 &&
                  packed.size(2) == kPanel && packed.is_contiguous(),
              "weight from pack_f32_weight expected");
  const int64_t m_dim = x.size(0), k_dim = x.size(1);
  const int64_t num_panels = packed.size(0), n_dim = num_panels * kPanel;
  TORCH_CHECK(packed.size(1) == k_dim, "x and weight disagree on K");
  at::Tensor y = at::empty({m_dim, n_dim}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t panel_stride = k_dim * kPanel;
  gemm::packed_gemm<Kernel>(xp, m_dim, k_dim, wp, num_panels, panel_stride, yp);
  return y;
}

}  // namespace tokenmill
