// Backward instantiations for head dim 64 (bf16 and fp16, causal and not).
#include "bwd_kernel.cuh"

namespace avar::cuda {

cudaError_t launch_bwd_d64(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream) {
  return dispatch_bwd<64>(p, dt, s, stream);
}

}  // namespace avar::cuda
