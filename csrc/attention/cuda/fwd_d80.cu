// Forward instantiations for head dim 80 (bf16 and fp16, causal and not).
#include "fwd_kernel.cuh"

namespace avar::cuda {

cudaError_t launch_fwd_d80(const AttnFwdParams& p, DType dt, const FwdSplit& split, cudaStream_t stream) {
  return dispatch_fwd<80>(p, dt, split, stream);
}

}  // namespace avar::cuda
