// Forward instantiations for head dim 80: both shapes with K/V tiles of 64 keys (bf16 and fp16, causal and not).
#include "fwd_kernel.cuh"

namespace avar::cuda {

AVAR_INSTANTIATE_FWD(80, k8x16, 64)
AVAR_INSTANTIATE_FWD(80, k4x32, 64)

}  // namespace avar::cuda
