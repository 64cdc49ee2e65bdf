// The loop both packed GEMMs share (gemm_bf16_cpu.cpp, gemm_f32_cpu.cpp): the weight is packed
// into panels of kPanel output columns; each tile is up to kMR rows x kNR panels, and a
// kernel's `Kernel::template tile<MR, NR>(x, k_dim, panels, panel_stride, y, n_dim)` computes
// one with its accumulators in registers. Threads split the column panels (and, for many rows,
// the rows too), so at one row (decode) each thread streams its share of the weight once.
#pragma once

#include <ATen/Parallel.h>
#if defined(__SSE__)
#include <immintrin.h>
#endif

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

// Where tiles go: straight into y [m_dim, n_dim]. Another sink (gemm_bf16_argmax) has each
// tile written to a small per-thread buffer and folds it into its own result.
template <typename T>
struct StoreTiles {
  T* y;
  int64_t n_dim;
  // The tile at rows m0.., panels p0..: where to write it and its row stride.
  T* tile(int64_t m0, int64_t p0, int64_t& stride) {
    stride = n_dim;
    return y + m0 * n_dim + p0 * kPanel;
  }
  void done(int64_t /*m0*/, int64_t /*rows*/, int64_t /*p0*/, int64_t /*np*/) {}
};

// x[m_dim, k_dim] @ W^T, tile by tile into `sink`; panel p of W starts at w + p * panel_stride
// (elements of T). Work items are (column tile, row chunk): a matrix with few column tiles
// (576 outputs are 9 tiles) is also split by rows when there are many, so two threads never
// wait on an odd tile; a thread's items are consecutive row chunks of the same tile, so its
// weight strip stays in cache.
template <class Kernel, typename T, class Sink>
void packed_gemm_into(const T* x, int64_t m_dim, int64_t k_dim, const T* w, int64_t num_panels,
                      int64_t panel_stride, Sink& sink) {
  const int64_t num_tiles = (num_panels + kNR - 1) / kNR;
  const int64_t wanted = (8 * at::get_num_threads() + num_tiles - 1) / num_tiles;
  const int64_t row_chunks = std::max<int64_t>(1, std::min(wanted, m_dim / (4 * kMR)));
  const int64_t chunk_rows = ((m_dim + row_chunks - 1) / row_chunks + kMR - 1) / kMR * kMR;
  at::parallel_for(0, num_tiles * row_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / row_chunks, rc = item % row_chunks;
      const int64_t p0 = t * kNR, np = std::min<int64_t>(kNR, num_panels - p0);
      const T* panels = w + p0 * panel_stride;
      const int64_t m_begin = rc * chunk_rows, m_end = std::min(m_dim, (rc + 1) * chunk_rows);
      // The last row chunk of a tile, with three or more row blocks, also prefetches (a share
      // per block) the next tile's weight strip, so that tile does not start waiting on memory.
      const int64_t blocks = (m_end - m_begin + kMR - 1) / kMR;
      const char* next = reinterpret_cast<const char*>(panels + kNR * panel_stride);
      const int64_t next_bytes = (t + 1 < num_tiles && rc + 1 == row_chunks && blocks > 2)
          ? std::min<int64_t>(kNR, num_panels - p0 - kNR) * panel_stride * sizeof(T) : 0;
      for (int64_t m0 = m_begin; m0 < m_end; m0 += kMR) {
#if defined(__SSE__)
        const int64_t blk = (m0 - m_begin) / kMR;
        for (int64_t b = next_bytes * blk / blocks / 64 * 64; b < next_bytes * (blk + 1) / blocks;
             b += 64)
          _mm_prefetch(next + b, _MM_HINT_T0);
#endif
        const int64_t rows = std::min<int64_t>(kMR, m_dim - m0);
        const T* xr = x + m0 * k_dim;
        int64_t stride = 0;
        T* yr = sink.tile(m0, p0, stride);
        switch (np) {
          case 1: rows_tile<Kernel, 1>(rows, xr, k_dim, panels, panel_stride, yr, stride); break;
          case 2: rows_tile<Kernel, 2>(rows, xr, k_dim, panels, panel_stride, yr, stride); break;
          case 3: rows_tile<Kernel, 3>(rows, xr, k_dim, panels, panel_stride, yr, stride); break;
          default: rows_tile<Kernel, 4>(rows, xr, k_dim, panels, panel_stride, yr, stride); break;
        }
        sink.done(m0, rows, p0, np);
      }
    }
  });
}

// y[m_dim, num_panels * kPanel] = x[m_dim, k_dim] @ W^T.
template <class Kernel, typename T>
void packed_gemm(const T* x, int64_t m_dim, int64_t k_dim, const T* w, int64_t num_panels,
                 int64_t panel_stride, T* y) {
  StoreTiles<T> sink{y, num_panels * kPanel};
  packed_gemm_into<Kernel>(x, m_dim, k_dim, w, num_panels, panel_stride, sink);
}

}  // namespace tokenmill::gemm
