// Backward instantiations for head dim 64 with 8 warps (128-key blocks; bf16 and fp16, causal and not).
#include "bwd_kernel.cuh"

namespace avar::cuda {

template cudaError_t launch_bwd<64, 8>(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream);

}  // namespace avar::cuda
