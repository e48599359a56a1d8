// The CUDA device emulated on the CPU, so that machines without a GPU run the kernels of this folder: compiled
// by the host compiler with AVAR_CUDA_EMULATION, each launch runs its CTAs one after another, every CUDA thread
// of a CTA a cooperative fiber. Warp-wide instructions (mma.sync, ldmatrix, shfl) and __syncthreads are
// rendezvous points: each lane leaves its operands, the last lane to arrive computes every lane's result from
// the PTX fragment layouts, and the others resume with theirs. cp.async copies land only at the cp.async.wait
// that covers their group, and shared memory starts as NaN, so a tile read too early reads NaN.
//
// A launch fails with a message, where a GPU would fault, hang or silently read garbage, when: threads of a CTA
// wait at barriers or warp instructions that not all of them reach (deadlock), a warp's lanes issue different
// warp instructions, an ldmatrix / cp.async address is misaligned or outside the CTA's shared memory, or the
// CTA asks for more shared memory than sm_80 offers.
//
// Not emulated: timing, memory ordering between CTAs (they run one after another), the exact rounding of the
// tensor cores (products are exact and sums are rounded in fp32, in an order of our own) and of fast-math
// intrinsics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // dim3, uint3, float2, cudaError_t: host declarations only

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

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

// Runs body once per (block, thread) of the grid; cudaErrorLaunchFailure with last_error() set when it fails.
cudaError_t launch(dim3 grid, int threads, size_t smem_bytes, const std::function<void()>& body);

// What made the last failing launch of this thread fail.
const char* last_error();

// The multiprocessor count the emulated device reports (AVAR_EMULATED_SM_COUNT, default 8).
int sm_count();

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

// Fibers of one launch never run at the same time, so a plain read-modify-write is atomic here.
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

using std::isfinite;

inline int min(int a, int b) {
  return a < b ? a : b;
}
inline int max(int a, int b) {
  return a > b ? a : b;
}
