// One Llama decoder layer for a pure-decode step on the CPU, in bf16, as a single call.
//
// At batch 1 the layer's math is a few GEMVs; in eager PyTorch it is ~25 operator calls whose
// dispatch costs add up to a third of the step. Here the small element-wise work (RMSNorm,
// rotary, K/V write, SiLU*up, residual adds) runs as plain loops in fp32 and the products go
// to the packed GEMM and the paged decode kernel, so the layer costs little beyond streaming
// its weights once.
//
//   x            [T, E] bf16, updated in place (the residual stream); T = number of requests,
//                one new token each
//   cos, sin     [T, D] fp32 rotary angles of each token's position (rotate-half layout)
//   kv_cache     [2, NB, BS, Hkv, D] bf16; slot_mapping [T]; block_table [T, MB]; seq_lens [T]

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "kernels.h"
#include "simd.h"

#include <cmath>
#include <cstring>

namespace {

inline float bf16_to_float(at::BFloat16 v) { return static_cast<float>(v); }

// out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w, computed in fp32, rounded once.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t rows = x.size(0), dim = x.size(1);
  at::Tensor out = at::empty_like(x);
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = w.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float sum = 0.f;
      for (int64_t d = 0; d < dim; ++d) {
        const float v = bf16_to_float(xp[t * dim + d]);
        sum += v * v;
      }
      const float inv = 1.f / std::sqrt(sum / dim + static_cast<float>(eps));
      for (int64_t d = 0; d < dim; ++d)
        op[t * dim + d] = bf16_to_float(xp[t * dim + d]) * inv * bf16_to_float(wp[d]);
    }
  });
  return out;
}

// Rotate-half rotary of `heads` vectors of size dim, in place.
void rotate(at::BFloat16* v, int64_t heads, int64_t dim, const float* cos, const float* sin) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    at::BFloat16* p = v + h * dim;
    for (int64_t d = 0; d < half; ++d) {
      const float a = bf16_to_float(p[d]), b = bf16_to_float(p[d + half]);
      p[d] = a * cos[d] - b * sin[d];
      p[d + half] = b * cos[d + half] + a * sin[d + half];
    }
  }
}

// out[i] = silu(gate[i]) * up[i], gate = gu[0:n], up = gu[n:2n].
void silu_mul(const at::BFloat16* gu, int64_t n, at::BFloat16* out) {
  int64_t i = 0;
#if TOKENMILL_AVX512 && defined(__AVX512BF16__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = tokenmill::load16(gu + i), u = tokenmill::load16(gu + n + i);
    const __m512 e = tokenmill::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 y = _mm512_div_ps(_mm512_mul_ps(g, u), _mm512_add_ps(one, e));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh(y));
  }
#endif
  for (; i < n; ++i) {
    const float g = bf16_to_float(gu[i]), u = bf16_to_float(gu[n + i]);
    out[i] = g / (1.f + std::exp(-g)) * u;
  }
}

void add_into(at::Tensor& x, const at::Tensor& y) {
  auto* xp = x.data_ptr<at::BFloat16>();
  const auto* yp = y.data_ptr<at::BFloat16>();
  for (int64_t i = 0, n = x.numel(); i < n; ++i)
    xp[i] = bf16_to_float(xp[i]) + bf16_to_float(yp[i]);
}

}  // namespace

namespace tokenmill {

void llama_decode_layer(at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& post_norm,
                        double eps, const at::Tensor& qkv_packed, const at::Tensor& o_packed,
                        const at::Tensor& gate_up_packed, const at::Tensor& down_packed,
                        const at::Tensor& cos, const at::Tensor& sin, at::Tensor& kv_cache,
                        const at::Tensor& slot_mapping, const at::Tensor& block_table,
                        const at::Tensor& seq_lens, int64_t num_heads, int64_t num_kv_heads,
                        double scale) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "bf16 x [T, E] expected");
  TORCH_CHECK(kv_cache.scalar_type() == at::kBFloat16, "bf16 KV cache expected");
  const int64_t tokens = x.size(0), dim = kv_cache.size(4);
  const int64_t q_size = num_heads * dim, kv_size = num_kv_heads * dim;

  at::Tensor qkv = gemm_bf16_packed(rms_norm(x, input_norm, eps), qkv_packed);  // [T, q+2kv]
  at::Tensor q = at::empty({tokens, num_heads, dim}, x.options());
  auto* qkv_p = qkv.data_ptr<at::BFloat16>();
  auto* q_p = q.data_ptr<at::BFloat16>();
  auto* k_cache = kv_cache[0].data_ptr<at::BFloat16>();
  auto* v_cache = kv_cache[1].data_ptr<at::BFloat16>();
  const auto* slots = slot_mapping.data_ptr<int64_t>();
  const float* cos_p = cos.data_ptr<float>();
  const float* sin_p = sin.data_ptr<float>();
  const int64_t row = q_size + 2 * kv_size;
  for (int64_t t = 0; t < tokens; ++t) {
    at::BFloat16* r = qkv_p + t * row;
    rotate(r, num_heads + num_kv_heads, dim, cos_p + t * dim, sin_p + t * dim);
    std::memcpy(q_p + t * q_size, r, q_size * sizeof(at::BFloat16));
    // The cache slot of this token holds all KV heads contiguously: [Hkv, D].
    std::memcpy(k_cache + slots[t] * kv_size, r + q_size, kv_size * sizeof(at::BFloat16));
    std::memcpy(v_cache + slots[t] * kv_size, r + q_size + kv_size,
                kv_size * sizeof(at::BFloat16));
  }
  at::Tensor attn = paged_decode_attention(q, kv_cache[0], kv_cache[1], block_table, seq_lens,
                                           scale, 0);
  add_into(x, gemm_bf16_packed(attn.view({tokens, q_size}), o_packed));

  at::Tensor gate_up = gemm_bf16_packed(rms_norm(x, post_norm, eps), gate_up_packed);  // [T, 2I]
  const int64_t inter = gate_up.size(1) / 2;
  at::Tensor act = at::empty({tokens, inter}, x.options());
  const auto* gu = gate_up.data_ptr<at::BFloat16>();
  auto* ap = act.data_ptr<at::BFloat16>();
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) silu_mul(gu + t * 2 * inter, inter, ap + t * inter);
  });
  add_into(x, gemm_bf16_packed(act, down_packed));
}

}  // namespace tokenmill
