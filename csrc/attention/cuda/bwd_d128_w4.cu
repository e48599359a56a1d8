// Backward instantiations for head dim 128 with 4 warps (64-key blocks; bf16 and fp16, causal and not).
#include "bwd_kernel.cuh"

namespace avar::cuda {

template cudaError_t launch_bwd<128, 4>(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream);

}  // namespace avar::cuda
