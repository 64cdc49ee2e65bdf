// Decode attention instantiated for float32 caches (its own translation unit: the dtypes
// compile in parallel).
#include "paged_attention_driver.h"

namespace tokenmill::attention {
template void decode_attention<float>(const DecodeProblem&, const float*, const float*,
                                      const float*, float*);
}  // namespace tokenmill::attention
