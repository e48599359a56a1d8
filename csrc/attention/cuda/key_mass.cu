// Key-mass instantiations for every head dim (bf16 and fp16, causal and not).
#include "key_mass_kernel.cuh"

namespace avar::cuda {

template cudaError_t launch_key_mass<64>(const KeyMassParams& p, DType dt, cudaStream_t stream);
template cudaError_t launch_key_mass<80>(const KeyMassParams& p, DType dt, cudaStream_t stream);
template cudaError_t launch_key_mass<128>(const KeyMassParams& p, DType dt, cudaStream_t stream);

}  // namespace avar::cuda
