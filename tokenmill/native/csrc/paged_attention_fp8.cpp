// Decode attention instantiated for fp8 (e4m3) caches with per-(slot, KV head) scales, for
// float32 and bfloat16 queries (its own translation unit: the dtypes compile in parallel).
#include "paged_attention_driver.h"

namespace tokenmill::attention {
template void decode_attention<float, Fp8>(const DecodeProblem&, const float*, const Fp8*,
                                           const Fp8*, float*);
template void decode_attention<c10::BFloat16, Fp8>(const DecodeProblem&, const c10::BFloat16*,
                                                   const Fp8*, const Fp8*, c10::BFloat16*);
}  // namespace tokenmill::attention
