// The one dtype / causality switch and the one launch helper of every CUDA kernel (device-side files only).
#pragma once

#ifdef AVAR_CUDA_EMULATION
#include "emulation.h"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "launch.h"

namespace avar::cuda {

template <typename T>
struct ElemTag {
  using type = T;
};

// Calls f(ElemTag<T>{}) with T the CUDA element type of dt.
template <typename F>
cudaError_t with_dtype(DType dt, F&& f) {
  if (dt == DType::kBFloat16) return f(ElemTag<__nv_bfloat16>{});
  return f(ElemTag<__half>{});
}

// Calls f(ElemTag<T>{}, std::bool_constant<causal>{}).
template <typename F>
cudaError_t with_dtype_causal(DType dt, bool causal, F&& f) {
  return with_dtype(dt, [&](auto elem) { return causal ? f(elem, std::true_type{}) : f(elem, std::false_type{}); });
}

// Blocks of `block` covering `n` items.
inline unsigned blocks_for(int64_t n, int64_t block) {
  return static_cast<unsigned>((n + block - 1) / block);
}

// Launches kernel<<<grid, threads, smem, stream>>>(args...). An empty grid is not launched: CUDA refuses a
// zero-size grid, and it arises legitimately (varlen with every sequence empty, max_seqlen_q = 0) when the host
// has already written the answer for every row.
template <typename... KernelArgs, typename... Args>
cudaError_t launch(void (*kernel)(KernelArgs...), dim3 grid, int threads, size_t smem, cudaStream_t stream,
                   const Args&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
#ifdef AVAR_CUDA_EMULATION
  (void)stream;
  return cuda_emulation::launch(grid, threads, smem, [&] { kernel(args...); });
#else
  if (smem > 0) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  // clang-format off
  kernel<<<grid, threads, smem, stream>>>(args...);
  // clang-format on
  return cudaGetLastError();
#endif
}

}  // namespace avar::cuda
