// Decode attention instantiated for bfloat16 caches (its own translation unit: the dtypes
// compile in parallel).
#include "paged_attention_driver.h"

namespace tokenmill::attention {
template void decode_attention<c10::BFloat16>(const DecodeProblem&, const c10::BFloat16*,
                                              const c10::BFloat16*, const c10::BFloat16*,
                                              c10::BFloat16*);
}  // namespace tokenmill::attention
