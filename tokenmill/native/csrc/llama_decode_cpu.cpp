// One Llama decoder layer for a pure-decode step on the CPU, in bf16, as a single call; and the
// same layer in two halves around attention done elsewhere (a step that carries prompt chunks:
// llama_layer_qkv, then the caller's attention, then llama_layer_out).
//
// At batch 1 the layer's math is a few GEMVs; in eager PyTorch it is ~25 operator calls whose
// dispatch costs add up to a third of the step. Here the small element-wise work (RMSNorm,
// rotary, K/V write, SiLU*up, residual adds) runs as vectorised fp32 loops over the rows in
// parallel, and the products go to the packed GEMM and the paged decode kernel, so the layer
// costs little beyond its GEMMs.
//
//   x            [T, E] bf16, updated in place (the residual stream); T = number of requests,
//                one new token each
//   cos, sin     [T, D] fp32 rotary angles of each token's position (rotate-half layout)
//   kv_cache     [2, NB, BS, Hkv, D] bf16, or int8 / fp8 (e4m3) with kv_scales [2, NB, Hkv, BS]
//                bf16 beside it (tokenmill/attention/kv_quant.py): the new K/V are quantized
//                into their slots and attention reads the 1-byte values in place
//   slot_mapping [T]; block_table [T, MB]; seq_lens [T]

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "kernels.h"
#include "paged_attention_kv_quant.h"
#include "simd.h"

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace {

#if TOKENMILL_AVX512
using tokenmill::load16;
using tokenmill::store16;
#endif
using bf16 = at::BFloat16;
using tokenmill::kLanes;
using tokenmill::to_float;

// Row-wise element work, vectorised 16 lanes at a time with a scalar tail, rows in parallel.
template <typename F>
void for_rows(int64_t rows, F&& f) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) f(t);
  });
}

// x[:] += y[:] in bf16 (the sum rounded once).
void add_row(bf16* x, const bf16* y, int64_t dim) {
  int64_t d = 0;
#if TOKENMILL_AVX512
  for (; d + 16 <= dim; d += 16) store16(x + d, _mm512_add_ps(load16(x + d), load16(y + d)));
#endif
  for (; d < dim; ++d) x[d] = to_float(x[d]) + to_float(y[d]);
}

// out[:] = x * rsqrt(mean(x^2) + eps) * w, in fp32, rounded once.
void norm_row(const bf16* x, const bf16* w, int64_t dim, float eps, bf16* out) {
  int64_t d = 0;
  float sum = 0.f;
#if TOKENMILL_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= dim; d += 16) {
    const __m512 v = load16(x + d);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  float lanes[kLanes] = {};
  for (; d + kLanes <= dim; d += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += to_float(x[d + l]) * to_float(x[d + l]);
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  for (; d < dim; ++d) sum += to_float(x[d]) * to_float(x[d]);
  const float inv = 1.f / std::sqrt(sum / dim + eps);
  d = 0;
#if TOKENMILL_AVX512
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; d + 16 <= dim; d += 16)
    store16(out + d, _mm512_mul_ps(_mm512_mul_ps(load16(x + d), vinv), load16(w + d)));
#endif
  for (; d < dim; ++d) out[d] = to_float(x[d]) * inv * to_float(w[d]);
}

// RMSNorm of each row of x; with `residual`, first x += residual (in place).
at::Tensor rms_norm(at::Tensor& x, const at::Tensor& w, double eps,
                    const at::Tensor* residual = nullptr) {
  const int64_t dim = x.size(1);
  at::Tensor out = at::empty_like(x);
  bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = w.data_ptr<bf16>();
  const bf16* rp = residual ? residual->data_ptr<bf16>() : nullptr;
  bf16* op = out.data_ptr<bf16>();
  for_rows(x.size(0), [&](int64_t t) {
    if (rp) add_row(xp + t * dim, rp + t * dim, dim);
    norm_row(xp + t * dim, wp, dim, static_cast<float>(eps), op + t * dim);
  });
  return out;
}

// Rotate-half rotary of `heads` vectors of size dim, in place.
void rotate(bf16* v, int64_t heads, int64_t dim, const float* cos, const float* sin) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    bf16* p = v + h * dim;
    int64_t d = 0;
#if TOKENMILL_AVX512
    for (; d + 16 <= half; d += 16) {
      const __m512 a = load16(p + d), b = load16(p + d + half);
      const __m512 c0 = _mm512_loadu_ps(cos + d), c1 = _mm512_loadu_ps(cos + d + half);
      const __m512 s0 = _mm512_loadu_ps(sin + d), s1 = _mm512_loadu_ps(sin + d + half);
      store16(p + d, _mm512_fmsub_ps(a, c0, _mm512_mul_ps(b, s0)));
      store16(p + d + half, _mm512_fmadd_ps(b, c1, _mm512_mul_ps(a, s1)));
    }
#endif
    for (; d < half; ++d) {
      const float a = to_float(p[d]), b = to_float(p[d + half]);
      p[d] = a * cos[d] - b * sin[d];
      p[d + half] = b * cos[d + half] + a * sin[d + half];
    }
  }
}

// out[i] = silu(gate[i]) * up[i], gate = gu[0:n], up = gu[n:2n].
void silu_mul(const bf16* gu, int64_t n, bf16* out) {
  int64_t i = 0;
#if TOKENMILL_AVX512
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = load16(gu + i), u = load16(gu + n + i);
    const __m512 e = tokenmill::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    store16(out + i, _mm512_div_ps(_mm512_mul_ps(g, u), _mm512_add_ps(one, e)));
  }
#endif
  for (; i < n; ++i) {
    const float g = to_float(gu[i]), u = to_float(gu[n + i]);
    out[i] = g / (1.f + tokenmill::exp_lane(-g)) * u;
  }
}

// A weight as the layer gets it: packed bf16 (bits 16) or quantized (quant_gemm's layout),
// described by (bits, has_min, group, out_features, activation bits).
constexpr size_t kLayoutFields = 5;

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& packed, const int64_t* layout) {
  if (layout[0] == 16) return tokenmill::gemm_bf16_packed(x, packed);
  return tokenmill::quant_gemm(x, packed, layout[0], layout[1] != 0, layout[2], layout[3],
                               layout[4]);
}

// One layer's KV cache as the K/V write sees it: a bf16 cache, or an int8 / fp8 one with its
// scales [2, NB, Hkv, BS].
struct KvSlots {
  at::ScalarType dtype;
  void* k;
  void* v;
  bf16* k_scales = nullptr;
  bf16* v_scales = nullptr;
  int64_t heads, dim, block_size;

  KvSlots(at::Tensor& cache, const std::optional<at::Tensor>& scales)
      : dtype(cache.scalar_type()), k(cache[0].data_ptr()), v(cache[1].data_ptr()),
        heads(cache.size(3)), dim(cache.size(4)), block_size(cache.size(2)) {
    TORCH_CHECK(cache.is_contiguous() && cache.dim() == 5 && cache.size(0) == 2,
                "a contiguous KV cache [2, NB, BS, Hkv, D] expected");
    if (!scales) {
      TORCH_CHECK(dtype == at::kBFloat16, "bf16 KV cache expected (or kv_scales for int8 / fp8)");
      return;
    }
    TORCH_CHECK(dtype == at::kChar || dtype == at::kFloat8_e4m3fn,
                "a KV cache with scales must be int8 or float8_e4m3fn");
    const at::Tensor& s = *scales;
    TORCH_CHECK(s.scalar_type() == at::kBFloat16 && s.is_contiguous() && s.dim() == 4 &&
                    s.size(0) == 2 && s.size(1) == cache.size(1) && s.size(2) == heads &&
                    s.size(3) == block_size,
                "contiguous bf16 kv_scales [2, NB, Hkv, BS] of the cache expected");
    k_scales = s[0].data_ptr<bf16>();
    v_scales = s[1].data_ptr<bf16>();
  }

  // One token's K and V rows [Hkv, D] into cache slot `slot`: copied, or quantized.
  void store(const bf16* k_row, const bf16* v_row, int64_t slot) const {
    using tokenmill::attention::Fp8;
    using tokenmill::attention::store_token;
    const int64_t n = heads * dim;  // a slot holds all KV heads contiguously: [Hkv, D]
    if (dtype == at::kBFloat16) {
      std::memcpy(static_cast<bf16*>(k) + slot * n, k_row, n * sizeof(bf16));
      std::memcpy(static_cast<bf16*>(v) + slot * n, v_row, n * sizeof(bf16));
    } else if (dtype == at::kChar) {
      store_token(k_row, v_row, heads, dim, block_size, slot, static_cast<int8_t*>(k),
                  static_cast<int8_t*>(v), k_scales, v_scales);
    } else {
      store_token(k_row, v_row, heads, dim, block_size, slot, static_cast<Fp8*>(k),
                  static_cast<Fp8*>(v), k_scales, v_scales);
    }
  }
};

// Decode attention of q [T, H, D] over the layer's cache, float or quantized.
at::Tensor attend(const at::Tensor& q, const at::Tensor& kv_cache,
                  const std::optional<at::Tensor>& kv_scales, const at::Tensor& block_table,
                  const at::Tensor& seq_lens, double scale) {
  if (!kv_scales)
    return tokenmill::paged_decode_attention(q, kv_cache[0], kv_cache[1], block_table, seq_lens,
                                             scale, 0);
  return tokenmill::paged_decode_attention_quant(q, kv_cache[0], kv_cache[1], (*kv_scales)[0],
                                                 (*kv_scales)[1], block_table, seq_lens, scale,
                                                 0);
}

}  // namespace

namespace tokenmill {

at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "bf16 x and weight expected");
  TORCH_CHECK(w.dim() == 1 && x.size(-1) == w.size(0), "weight must match x's last dimension");
  at::Tensor rows = x.contiguous().view({-1, w.size(0)});
  return rms_norm(rows, w.contiguous(), eps).view(x.sizes());
}

at::Tensor llama_layer_qkv(at::Tensor& x, const at::Tensor& input_norm, double eps,
                           const std::vector<at::Tensor>& weights,
                           const std::vector<int64_t>& layouts, const at::Tensor& cos,
                           const at::Tensor& sin, at::Tensor& kv_cache,
                           const at::Tensor& slot_mapping, int64_t num_heads,
                           int64_t num_kv_heads, const std::optional<at::Tensor>& kv_scales) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "bf16 x [T, E] expected");
  const KvSlots slots_of_layer(kv_cache, kv_scales);
  TORCH_CHECK(slots_of_layer.heads == num_kv_heads, "the cache's KV heads must be num_kv_heads");
  TORCH_CHECK(weights.size() == 4 && layouts.size() == 4 * kLayoutFields,
              "four weights (qkv, o, gate_up, down) and their layouts expected");
  const int64_t tokens = x.size(0), dim = kv_cache.size(4);
  const int64_t q_size = num_heads * dim, kv_size = num_kv_heads * dim;
  at::Tensor qkv = linear_packed(rms_norm(x, input_norm, eps), weights[0], layouts.data());
  TORCH_CHECK(qkv.size(1) == q_size + 2 * kv_size, "the qkv weight must give q, k and v");
  bf16* qkv_p = qkv.data_ptr<bf16>();
  const auto* slots = slot_mapping.data_ptr<int64_t>();
  const float* cos_p = cos.data_ptr<float>();
  const float* sin_p = sin.data_ptr<float>();
  const int64_t row = q_size + 2 * kv_size;
  for_rows(tokens, [&](int64_t t) {
    bf16* r = qkv_p + t * row;
    rotate(r, num_heads + num_kv_heads, dim, cos_p + t * dim, sin_p + t * dim);
    slots_of_layer.store(r + q_size, r + q_size + kv_size, slots[t]);
  });
  return qkv;
}

void llama_layer_out(at::Tensor& x, const at::Tensor& attn, const at::Tensor& post_norm,
                     double eps, const std::vector<at::Tensor>& weights,
                     const std::vector<int64_t>& layouts) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "bf16 x [T, E] expected");
  TORCH_CHECK(attn.scalar_type() == at::kBFloat16 && attn.is_contiguous() && attn.dim() == 2 &&
                  attn.size(0) == x.size(0),
              "contiguous bf16 attention output [T, H * D] expected");
  TORCH_CHECK(weights.size() == 4 && layouts.size() == 4 * kLayoutFields,
              "four weights (qkv, o, gate_up, down) and their layouts expected");
  const auto linear = [&](const at::Tensor& in, int i) {
    return linear_packed(in, weights[i], layouts.data() + i * kLayoutFields);
  };
  const int64_t tokens = x.size(0);
  const at::Tensor attn_out = linear(attn, 1);

  // x += attn_out, then the MLP's norm of it, in one pass over x.
  at::Tensor gate_up = linear(rms_norm(x, post_norm, eps, &attn_out), 2);
  const int64_t inter = gate_up.size(1) / 2;
  at::Tensor act = at::empty({tokens, inter}, x.options());
  const bf16* gu = gate_up.data_ptr<bf16>();
  bf16* ap = act.data_ptr<bf16>();
  for_rows(tokens, [&](int64_t t) { silu_mul(gu + t * 2 * inter, inter, ap + t * inter); });
  const at::Tensor down = linear(act, 3);
  bf16* xp = x.data_ptr<bf16>();
  const bf16* dp = down.data_ptr<bf16>();
  const int64_t width = x.size(1);
  for_rows(tokens, [&](int64_t t) { add_row(xp + t * width, dp + t * width, width); });
}

void llama_decode_layer(at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& post_norm,
                        double eps, const std::vector<at::Tensor>& weights,
                        const std::vector<int64_t>& layouts,
                        const at::Tensor& cos, const at::Tensor& sin, at::Tensor& kv_cache,
                        const at::Tensor& slot_mapping, const at::Tensor& block_table,
                        const at::Tensor& seq_lens, int64_t num_heads, int64_t num_kv_heads,
                        double scale, const std::optional<at::Tensor>& kv_scales) {
  const at::Tensor qkv = llama_layer_qkv(x, input_norm, eps, weights, layouts, cos, sin, kv_cache,
                                         slot_mapping, num_heads, num_kv_heads, kv_scales);
  const int64_t tokens = x.size(0), dim = kv_cache.size(4);
  const at::Tensor q =
      qkv.narrow(1, 0, num_heads * dim).contiguous().view({tokens, num_heads, dim});
  const at::Tensor attn = attend(q, kv_cache, kv_scales, block_table, seq_lens, scale);
  llama_layer_out(x, attn.view({tokens, num_heads * dim}), post_norm, eps, weights, layouts);
}

}  // namespace tokenmill
