// Python bindings of the native CPU kernels (one extension module for all of them).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &tokenmill::paged_decode_attention,
        "decode attention over a paged KV cache (CPU)");
  m.def("pack_bf16_weight", &tokenmill::pack_bf16_weight,
        "repack a bf16 [N, K] weight into gemm_bf16_packed's panels");
  m.def("gemm_bf16_packed", &tokenmill::gemm_bf16_packed,
        "x [M, K] @ W^T for a packed bf16 weight (CPU, AVX512-BF16)");
  m.def("llama_decode_layer", &tokenmill::llama_decode_layer,
        "one Llama decoder layer of a pure-decode step, bf16, in place on x (CPU)");
  m.def("has_avx512_bf16", &tokenmill::has_avx512_bf16, "whether the bf16 GEMM is compiled in");
}
