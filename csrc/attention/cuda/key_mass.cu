// Key-mass instantiations for every head dim (bf16 and fp16, causal and not).
#include "key_mass_kernel.cuh"

namespace avar::cuda {

cudaError_t launch_key_mass_d64(const KeyMassParams& p, DType dt, cudaStream_t stream) {
  return dispatch_key_mass<64>(p, dt, stream);
}

cudaError_t launch_key_mass_d80(const KeyMassParams& p, DType dt, cudaStream_t stream) {
  return dispatch_key_mass<80>(p, dt, stream);
}

cudaError_t launch_key_mass_d128(const KeyMassParams& p, DType dt, cudaStream_t stream) {
  return dispatch_key_mass<128>(p, dt, stream);
}

}  // namespace avar::cuda
