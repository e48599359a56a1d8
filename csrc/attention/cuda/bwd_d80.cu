// Backward instantiations for head dim 80 (bf16 and fp16, causal and not).
#include "bwd_kernel.cuh"

namespace avar::cuda {

cudaError_t launch_bwd_d80(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream) {
  return dispatch_bwd<80>(p, dt, s, stream);
}

}  // namespace avar::cuda
