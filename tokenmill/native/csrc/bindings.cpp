// Python bindings of the native CPU kernels (one extension module for all of them).
#include <torch/csrc/utils/pybind.h>

#include "kernels.h"
#include "simd.h"

namespace {

// The instruction set the variant was compiled for (the fast paths it holds).
const char* isa() {
#if defined(__AVX512BF16__) && TOKENMILL_AVX512
  return "avx512_bf16";
#elif TOKENMILL_AVX512
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__ARM_NEON)
  return "neon";
#else
  return "generic";
#endif
}

}  // namespace

// The compute functions release the GIL, as PyTorch's own operators do: a server's event-loop
// thread then streams tokens while the engine thread is inside a kernel.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using no_gil = py::call_guard<py::gil_scoped_release>;
  m.def("paged_decode_attention", &tokenmill::paged_decode_attention, no_gil(),
        "decode attention over a paged KV cache (CPU)");
  m.def("paged_decode_attention_quant", &tokenmill::paged_decode_attention_quant, no_gil(),
        "decode attention over a paged int8 / fp8 KV cache with per-(slot, KV head) scales (CPU)");
  m.def("write_kv_quant", &tokenmill::write_kv_quant, no_gil(),
        "quantize K/V [T, Hkv, D] into their slots of an int8 / fp8 KV cache and its scales (CPU)");
  m.def("pack_bf16_weight", &tokenmill::pack_bf16_weight, no_gil(),
        "repack a bf16 [N, K] weight into gemm_bf16_packed's panels");
  m.def("gemm_bf16_packed", &tokenmill::gemm_bf16_packed, no_gil(),
        "x [M, K] @ W^T for a packed bf16 weight (CPU)");
  m.def("gemm_bf16_argmax", &tokenmill::gemm_bf16_argmax, no_gil(),
        "each row's argmax of x [M, K] @ W^T for a packed bf16 weight, without the product");
  m.def("pack_f32_weight", &tokenmill::pack_f32_weight, no_gil(),
        "repack an fp32 [N, K] weight into gemm_f32_packed's panels");
  m.def("gemm_f32_packed", &tokenmill::gemm_f32_packed, no_gil(),
        "x [M, K] @ W^T for a packed fp32 weight (CPU), for few rows");
  m.def("quant_gemm", &tokenmill::quant_gemm, no_gil(),
        "x [M, K] @ W^T for a quantized weight packed by tokenmill.quant.packing (CPU)",
        py::arg("x"), py::arg("packed"), py::arg("bits"), py::arg("has_min"), py::arg("group"),
        py::arg("n_dim"), py::arg("act_bits") = 8);
  m.def("has_avx512_vnni", &tokenmill::has_avx512_vnni,
        "whether the AVX512-VNNI quantized GEMM is compiled in (else a portable loop)");
  m.def("argmax_last_dim", &tokenmill::argmax_last_dim, no_gil(),
        "first position of each row's largest value, [N, V] -> [N] (CPU)");
  m.def("argmax_last_dim_masked", &tokenmill::argmax_last_dim_masked, no_gil(),
        "argmax_last_dim where the given rows pick only tokens their bitmask allows (CPU)");
  m.def("rms_norm_bf16", &tokenmill::rms_norm_bf16, no_gil(),
        "RMSNorm of bf16 rows, computed in fp32 (CPU)");
  m.def("llama_decode_layer", &tokenmill::llama_decode_layer, no_gil(),
        "one Llama decoder layer of a pure-decode step, bf16, in place on x (CPU)");
  m.def("llama_layer_qkv", &tokenmill::llama_layer_qkv, no_gil(),
        "a Llama layer's normed, rotated QKV rows, K/V stored into the cache (CPU)");
  m.def("llama_layer_out", &tokenmill::llama_layer_out, no_gil(),
        "a Llama layer after attention: o_proj, residual, MLP block, in place on x (CPU)");
  m.def("has_avx512f", &tokenmill::has_avx512f, "whether the AVX-512 paths are compiled in");
  m.def("has_avx512_bf16", &tokenmill::has_avx512_bf16,
        "whether the AVX512-BF16 GEMM is compiled in (else a portable loop)");
  m.def("isa", &isa, "the instruction set the kernels were compiled for");
}
