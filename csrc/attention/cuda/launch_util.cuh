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
// has already written the answer for every row. A failure is recorded in last_launch() for the host's message.
template <typename... KernelArgs, typename... Args>
cudaError_t launch(void (*kernel)(KernelArgs...), dim3 grid, int threads, size_t smem, cudaStream_t stream,
                   const Args&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  LaunchRecord& record = last_launch();
  record = LaunchRecord{reinterpret_cast<const void*>(kernel), grid, threads, smem, cudaSuccess};
#ifdef AVAR_CUDA_EMULATION
  (void)stream;
  // The closure lives in this frame, on the launching thread's stack, where the emulated kernels may read it.
  auto body = [&] { kernel(args...); };
  cuda_emulation::LaunchConfig config;
  config.kernel = record.kernel;
  config.grid = grid;
  config.threads = threads;
  config.smem_bytes = smem;
  record.error =
      cuda_emulation::launch(config, [](void* closure) { (*static_cast<decltype(body)*>(closure))(); }, &body);
  return record.error;
#else
  if (smem > 0) {
    record.error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (record.error != cudaSuccess) return record.error;
  }
  // clang-format off
  kernel<<<grid, threads, smem, stream>>>(args...);
  // clang-format on
  record.error = cudaGetLastError();
  return record.error;
#endif
}

}  // namespace avar::cuda
