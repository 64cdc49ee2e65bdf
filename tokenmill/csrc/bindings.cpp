// Python bindings of the native CPU kernels (one extension module for all of them).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &tokenmill::paged_decode_attention,
        "decode attention over a paged KV cache (CPU)");
  m.def("linear_bf16", &tokenmill::linear_bf16,
        "skinny bf16 x @ W^T for decode (CPU, AVX512-BF16)");
  m.def("has_avx512_bf16", &tokenmill::has_avx512_bf16, "whether linear_bf16 is compiled in");
}
