// Forward instantiation for head dim 128 (bf16 and fp16, causal and not).
#include "fwd_kernel.cuh"

namespace avar::cuda {

template cudaError_t launch_fwd<128>(const AttnFwdParams& p, DType dt, const FwdSplit& split, cudaStream_t stream);

}  // namespace avar::cuda
