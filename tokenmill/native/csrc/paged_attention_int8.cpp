// Decode attention instantiated for int8 caches with per-(slot, KV head) scales, for float32 and
// bfloat16 queries (its own translation unit: the dtypes compile in parallel).
#include "paged_attention_driver.h"

namespace tokenmill::attention {
template void decode_attention<float, int8_t>(const DecodeProblem&, const float*, const int8_t*,
                                              const int8_t*, float*);
template void decode_attention<c10::BFloat16, int8_t>(const DecodeProblem&, const c10::BFloat16*,
                                                      const int8_t*, const int8_t*,
                                                      c10::BFloat16*);
}  // namespace tokenmill::attention
