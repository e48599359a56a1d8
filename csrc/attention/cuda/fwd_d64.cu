// Forward instantiations for head dim 64 (bf16 and fp16, causal and not).
#include "fwd_kernel.cuh"

namespace avar::cuda {

cudaError_t launch_fwd_d64(const AttnFwdParams& p, DType dt, const FwdSplit& split, cudaStream_t stream) {
  return dispatch_fwd<64>(p, dt, split, stream);
}

}  // namespace avar::cuda
