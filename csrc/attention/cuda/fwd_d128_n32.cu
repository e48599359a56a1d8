// Forward instantiations for head dim 128 with K/V tiles of 32 keys (bf16 and fp16, causal and not): 8 warps × 16
// rows where 64-key tiles do not fit (the 99 KB of sm_86 / sm_89 / sm_120), and 4 warps × 32 rows everywhere (with
// 64-key tiles its accumulators leave too few registers: ptxas spills).
#include "fwd_kernel.cuh"

namespace avar::cuda {

AVAR_INSTANTIATE_FWD(128, k8x16, 32)
AVAR_INSTANTIATE_FWD(128, k4x32, 32)

}  // namespace avar::cuda
