// The loop both packed GEMMs share (gemm_bf16_cpu.cpp, gemm_f32_cpu.cpp): the weight is packed
// into panels of kPanel output columns; each tile is up to kMR rows x kNR panels, and a
// kernel's `Kernel::template tile<MR, NR>(x, k_dim, panels, panel_stride, y, n_dim)` computes
// one with its accumulators in registers. Threads split the column panels, so at one row
// (decode) each thread streams its share of the weight exactly once.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace tokenmill::gemm {

constexpr int64_t kPanel = 16;  // output columns per panel (one zmm of fp32 accumulators)
constexpr int64_t kNR = 4;      // panels per tile
constexpr int64_t kMR = 6;      // rows per tile

template <class Kernel, int NR, typename T>
void rows_tile(int64_t rows, const T* x, int64_t k_dim, const T* panels, int64_t panel_stride,
               T* y, int64_t n_dim) {
  switch (rows) {
    case 1: Kernel::template tile<1, NR>(x, k_dim, panels, panel_stride, y, n_dim); break;
    case 2: Kernel::template tile<2, NR>(x, k_dim, panels, panel_stride, y, n_dim); break;
    case 3: Kernel::template tile<3, NR>(x, k_dim, panels, panel_stride, y, n_dim); break;
    case 4: Kernel::template tile<4, NR>(x, k_dim, panels, panel_stride, y, n_dim); break;
    case 5: Kernel::template tile<5, NR>(x, k_dim, panels, panel_stride, y, n_dim); break;
    default: Kernel::template tile<6, NR>(x, k_dim, panels, panel_stride, y, n_dim); break;
  }
}

// y[m_dim, num_panels * kPanel] = x[m_dim, k_dim] @ W^T; panel p of W starts at
// w + p * panel_stride (elements of T).
template <class Kernel, typename T>
void packed_gemm(const T* x, int64_t m_dim, int64_t k_dim, const T* w, int64_t num_panels,
                 int64_t panel_stride, T* y) {
  const int64_t n_dim = num_panels * kPanel;
  const int64_t num_tiles = (num_panels + kNR - 1) / kNR;
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p0 = t * kNR, np = std::min<int64_t>(kNR, num_panels - p0);
      const T* panels = w + p0 * panel_stride;
      for (int64_t m0 = 0; m0 < m_dim; m0 += kMR) {
        const int64_t rows = std::min<int64_t>(kMR, m_dim - m0);
        const T* xr = x + m0 * k_dim;
        T* yr = y + m0 * n_dim + p0 * kPanel;
        switch (np) {
          case 1: rows_tile<Kernel, 1>(rows, xr, k_dim, panels, panel_stride, yr, n_dim); break;
          case 2: rows_tile<Kernel, 2>(rows, xr, k_dim, panels, panel_stride, yr, n_dim); break;
          case 3: rows_tile<Kernel, 3>(rows, xr, k_dim, panels, panel_stride, yr, n_dim); break;
          default: rows_tile<Kernel, 4>(rows, xr, k_dim, panels, panel_stride, yr, n_dim); break;
        }
      }
    }
  });
}

}  // namespace tokenmill::gemm
