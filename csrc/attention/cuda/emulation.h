// The CUDA device emulated on the CPU, so that machines without a GPU run the kernels of this folder: compiled
// by the host compiler with AVAR_CUDA_EMULATION, each launch runs its CTAs one after another, every CUDA thread
// of a CTA a cooperative fiber. Warp-wide instructions (mma.sync, ldmatrix, shfl) and __syncthreads are
// rendezvous points: each lane leaves its operands, the last lane to arrive computes every lane's result from
// the PTX fragment layouts, and the others resume with theirs.
//
// The device is one of the arch profiles of emulated_device.h (sm_80 ... sm_120), and a launch fails, with a
// message naming the kernel, where that GPU would refuse it, fault, hang or silently read garbage:
//   - it asks for more threads, dynamic shared memory or registers than the profile allows, or a grid past
//     CUDA's limits;
//   - threads of a CTA wait at barriers or warp instructions that not all of them reach (deadlock), or a warp's
//     lanes issue different warp instructions;
//   - an ldmatrix / cp.async address is misaligned or outside the CTA's shared memory;
//   - two warps touch the same shared-memory byte between two barriers and one of them writes (a missing
//     __syncthreads), a thread reads a cp.async destination before the cp.async.wait that covers it, another
//     warp touches it before that wait, or a thread reads shared memory no thread of the CTA wrote;
//   - a global load or store falls outside every buffer the host registered for the op (BufferScope).
// Races and bounds are seen on every memory access of the kernels, including plain pointer accesses: the kernel
// sources of the emulation build are compiled with the compiler's thread-sanitizer instrumentation
// (-fsanitize=thread, setup.py), whose per-access hooks (__tsan_read4, __tsan_write8, ...) emulation.cpp
// defines itself instead of linking the sanitizer's runtime.
//
// Timing is not emulated, but orderings are exercised: under a seed (set_seed), the warps run in a shuffled
// order between barriers, a thread may be preempted at any shared-memory access, and each cp.async copy lands at
// a random point between its issue and its wait. Shared memory starts as NaN (0xFF bytes) in every CTA.
//
// Not emulated: memory ordering between CTAs (they run one after another), races between lanes of one warp (a
// warp is one actor here), the exact rounding of the tensor cores (products are exact and sums are rounded in
// fp32, in an order of our own) and of fast-math intrinsics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // dim3, uint3, float2, cudaError_t: host declarations only

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "emulated_device.h"

// Host compilers see CUDA's qualifiers as attributes they do not know; here they mean nothing.
#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace avar::cuda_emulation {

uint3 thread_idx();
uint3 block_idx();
dim3 grid_dim();
dim3 block_dim();
void sync_threads();
unsigned char* dynamic_smem();

// The shared-memory address of p (its offset in the CTA's shared memory); p must lie inside it.
uint32_t smem_offset(const void* p);

enum class WarpOp : int { kShflXor, kLdmatrix, kLdmatrixTrans, kMmaBf16, kMmaF16 };
constexpr int kMaxIn = 10;  // mma: a[4], b[2], c[4]
constexpr int kMaxOut = 4;

// One lane's part of a warp-wide instruction; returns when all 32 lanes have issued it.
void warp_op(WarpOp op, const uint32_t (&in)[kMaxIn], uint32_t (&out)[kMaxOut]);

// cp.async.cg 16 bytes (zeros when !valid), cp.async.commit_group, cp.async.wait_group n.
void cp_async_16(void* smem, const void* gmem, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);

// atomicAdd on shared or global memory: atomic against other atomics, a race against plain accesses.
float atomic_add(float* address, float value);

// What a launch asks the device for.
struct LaunchConfig {
  const void* kernel = nullptr;  // the kernel's function, for its name in messages
  dim3 grid;
  int threads = 0;
  size_t smem_bytes = 0;
  int registers_per_thread = 0;  // 0: unknown (the host compiler allocates no registers), not checked
};

// Runs body(ctx) once per (block, thread) of the grid; an error code with last_error() set when it fails: the
// code a GPU would give where it refuses the launch (cudaErrorInvalidValue, cudaErrorInvalidConfiguration,
// cudaErrorLaunchOutOfResources), cudaErrorLaunchFailure for what it would fault on or hang in.
cudaError_t launch(const LaunchConfig& config, void (*body)(void*), void* ctx);

// What made the last failing launch of this thread fail.
const char* last_error();

// The demangled name of a kernel function without its arguments ("avar::cuda::fwd_kernel<__half, 128, true>").
std::string kernel_name(const void* kernel);

// The opt-in shared memory per CTA the emulated device reports (sm_80's).
size_t smem_optin_limit();

}  // namespace avar::cuda_emulation

#define threadIdx (::avar::cuda_emulation::thread_idx())
#define blockIdx (::avar::cuda_emulation::block_idx())
#define gridDim (::avar::cuda_emulation::grid_dim())
#define blockDim (::avar::cuda_emulation::block_dim())

inline void __syncthreads() {
  ::avar::cuda_emulation::sync_threads();
}

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  uint32_t in[::avar::cuda_emulation::kMaxIn] = {};
  uint32_t out[::avar::cuda_emulation::kMaxOut] = {};
  std::memcpy(&in[0], &value, 4);
  in[1] = static_cast<uint32_t>(lane_mask);
  ::avar::cuda_emulation::warp_op(::avar::cuda_emulation::WarpOp::kShflXor, in, out);
  T r;
  std::memcpy(&r, &out[0], 4);
  return r;
}

inline float atomicAdd(float* address, float value) {
  return ::avar::cuda_emulation::atomic_add(address, value);
}

using std::isfinite;

inline int min(int a, int b) {
  return a < b ? a : b;
}
inline int max(int a, int b) {
  return a > b ? a : b;
}
