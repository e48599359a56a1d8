// Forward instantiations for head dim 128 (bf16 and fp16, causal and not).
#include "fwd_kernel.cuh"

namespace avar::cuda {

cudaError_t launch_fwd_d128(const AttnFwdParams& p, DType dt, const FwdSplit& split, cudaStream_t stream) {
  return dispatch_fwd<128>(p, dt, split, stream);
}

}  // namespace avar::cuda
