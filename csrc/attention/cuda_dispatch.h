// CUDA side of the avar ops: CUDA-specific checks, scratch buffers, the current stream, the choice of the
// decode (split-KV) path, and the launch of the kernels in cuda/. Its Backend is called by attention_ops.cpp
// after every generic check (dtype fp16/bf16, head dim 64/80/128, shapes; values under the input checks) has
// passed, with the inputs' device current.
#pragma once

#include <ATen/ATen.h>
#ifndef AVAR_CUDA_EMULATION
#include <c10/cuda/CUDAGuard.h>
#endif

#include <cstdint>

#include "attention_ops.h"
#include "params.h"

namespace avar::cuda_dispatch {

extern const Backend kCudaBackend;

#ifdef AVAR_CUDA_EMULATION
// The CPU ops of an emulation build: float16 and bfloat16 inputs run the CUDA host code and kernels on the
// emulated device (cuda/emulation.h), under the CUDA rules; float32 and float64 run the CPU kernels.
extern const Backend kEmulationBackend;
#else
// The CUDA ops' scope: q's device is current while they run (the dispatcher does not set it for custom ops).
struct DeviceOf {
  c10::cuda::CUDAGuard guard;
  DeviceOf(const at::Tensor& q, const char*) : guard(q.device()) {}
};
#endif

// Key splits the forward uses for these sizes on `sm_count` multiprocessors (1 = no split).
int decode_splits(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k, int sm_count);

// What the forward uses on the current CUDA device: the forced count when set, else decode_splits.
int decode_splits_on_current_device(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k);

// Tests force the split path with n >= 2 (whatever the GPU's size); 0 restores the heuristic.
void set_forced_decode_splits(int n);

// Splits of each backward key block's steps over CTAs for these sizes on `sm_count` multiprocessors (1 = none).
int backward_splits(int64_t batch, int64_t heads, int64_t kv_heads, int64_t seqlen_q, int64_t seqlen_k, int sm_count);

// What the backward uses on the current device: the forced count when set, else backward_splits.
int backward_splits_on_current_device(int64_t batch, int64_t heads, int64_t kv_heads, int64_t seqlen_q,
                                      int64_t seqlen_k);

// Tests force backward splits with n >= 2; 0 restores the heuristic.
void set_forced_backward_splits(int n);

}  // namespace avar::cuda_dispatch
