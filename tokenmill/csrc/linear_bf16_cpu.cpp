// Skinny bf16 matmul for decode on the CPU: y[M, N] = x[M, K] @ W[N, K]^T with M small.
//
// At batch 1 a decode step is bound by streaming the weights once; the library GEMV reaches
// about half the machine's copy bandwidth here. This kernel streams W once for all M rows with
// AVX512-BF16 dot products (vdpbf16ps: 32 bf16 products per instruction), four weight rows at a
// time, on ATen's thread pool. Without AVX512-BF16 the extension still builds; the Python side
// then never calls it (has_avx512_bf16() is false).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "kernels.h"

#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define TOKENMILL_AVX512_BF16 1
#else
#define TOKENMILL_AVX512_BF16 0
#endif

namespace {

constexpr int64_t kMaxRows = 8;

#if TOKENMILL_AVX512_BF16
// Dot products of up to kMaxRows activation rows with 4 weight rows over K (K % 32 == 0).
template <int M>
inline void block4(const uint16_t* x, int64_t k_dim, const uint16_t* w, int64_t w_stride,
                   float* out, int64_t out_stride) {
  __m512 acc[M][4];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_dim; k += 32) {
    __m512bh wv[4];
    for (int r = 0; r < 4; ++r)
      wv[r] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(w + r * w_stride + k));
    for (int m = 0; m < M; ++m) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(x + m * k_dim + k));
      for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < 4; ++r) out[m * out_stride + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int M>
void run_rows(const uint16_t* x, const uint16_t* w, float* y, int64_t n_dim, int64_t k_dim) {
  at::parallel_for(0, n_dim / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk * 4;
      block4<M>(x, k_dim, w + n * k_dim, k_dim, y + n, n_dim);
    }
  });
}
#endif

}  // namespace

namespace tokenmill {

bool has_avx512_bf16() { return TOKENMILL_AVX512_BF16 == 1; }

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "bfloat16 inputs expected");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "contiguous inputs expected");
  const int64_t m_dim = x.size(0), k_dim = x.size(1), n_dim = w.size(0);
  TORCH_CHECK(m_dim >= 1 && m_dim <= kMaxRows, "1 to 8 rows supported");
  TORCH_CHECK(k_dim % 32 == 0 && n_dim % 4 == 0, "K % 32 == 0 and N % 4 == 0 required");
  at::Tensor y = at::empty({m_dim, n_dim}, x.options().dtype(at::kFloat));
#if TOKENMILL_AVX512_BF16
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  switch (m_dim) {
    case 1: run_rows<1>(xp, wp, yp, n_dim, k_dim); break;
    case 2: run_rows<2>(xp, wp, yp, n_dim, k_dim); break;
    case 3: run_rows<3>(xp, wp, yp, n_dim, k_dim); break;
    case 4: run_rows<4>(xp, wp, yp, n_dim, k_dim); break;
    case 5: run_rows<5>(xp, wp, yp, n_dim, k_dim); break;
    case 6: run_rows<6>(xp, wp, yp, n_dim, k_dim); break;
    case 7: run_rows<7>(xp, wp, yp, n_dim, k_dim); break;
    default: run_rows<8>(xp, wp, yp, n_dim, k_dim); break;
  }
#else
  TORCH_CHECK(false, "built without AVX512-BF16");
#endif
  return y.to(at::kBFloat16);
}

}  // namespace tokenmill
