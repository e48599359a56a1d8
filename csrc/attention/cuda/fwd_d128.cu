// Forward instantiation for head dim 128: 8 warps × 16 rows with K/V tiles of 64 keys (bf16 and fp16, causal and
// not).
#include "fwd_kernel.cuh"

namespace avar::cuda {

AVAR_INSTANTIATE_FWD(128, k8x16, 64)

}  // namespace avar::cuda
