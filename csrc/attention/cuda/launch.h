// Host entry points of the CUDA kernels, over the Params structs and raw device pointers. Compiled by both g++
// (cuda_dispatch.cpp) and nvcc, so it holds no torch and no device code. Every launcher returns the first CUDA
// error it met (cudaSuccess otherwise); the caller turns it into an exception.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "../params.h"

namespace avar::cuda {

enum class DType { kHalf, kBFloat16 };

// Tile sizes the host side needs for scratch sizes and the decode heuristic.
constexpr int kFwdBlockM = 128;  // query rows per forward CTA
constexpr int kFwdBlockN = 64;   // keys per forward K/V tile
constexpr int kBwdBlockN = 64;   // keys per backward / key-mass CTA
constexpr int kBwdBlockM = 64;   // query rows per key-mass step

// Split-KV (flash-decoding) partials, float32, indexed [split, b, h, i] with i < max_seqlen_q.
struct FwdSplit {
  int num_splits = 1;             // 1: no split, the kernel writes out / lse / mass directly
  float* out_partial = nullptr;   // [splits, B, H, Lq_max, D]
  float* lse_partial = nullptr;   // [splits, B, H, Lq_max]
  float* mass_partial = nullptr;  // [splits, B, H, Lq_max, G] (only when p.mass is set)
};

// Indexed by packed query row r (b·Lq + i batched, cu_seqlens_q[b] + i varlen), or packed key row likewise, so
// that scratch grows with the rows of q and k rather than with batch × the longest sequence.
struct BwdScratch {
  float* dq_accum = nullptr;  // [Tq, H, D], zeroed by the caller
  float* delta = nullptr;     // [Tq, H]: D_i = dO·O + Σ_g dmass·mass − dlse
  // Splits of each key block's steps (query heads × query blocks) over CTAs; with more than one, every split
  // writes its share of dK / dV here and launch_bwd_reduce_dkv sums them into dk / dv.
  int num_splits = 1;
  float* dk_partial = nullptr;  // [S, Tk, Hkv, D]
  float* dv_partial = nullptr;  // [S, Tk, Hkv, D]
};

// One instantiation per supported head dim, each in its own file (fwd_d*.cu, bwd_d*.cu, key_mass.cu) so that
// they compile in parallel.
template <int kD>
cudaError_t launch_fwd(const AttnFwdParams& p, DType dt, const FwdSplit& split, cudaStream_t stream);
template <int kD>
cudaError_t launch_bwd(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream);
template <int kD>
cudaError_t launch_key_mass(const KeyMassParams& p, DType dt, cudaStream_t stream);

// The one head-dim switch: calls f(std::integral_constant<int, D>{}) for a supported D. The host checks the
// head dim before any launch; an unsupported one is answered with cudaErrorInvalidValue.
template <typename F>
cudaError_t with_head_dim(int64_t head_dim, F&& f) {
  switch (head_dim) {
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 80:
      return f(std::integral_constant<int, 80>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    default:
      return cudaErrorInvalidValue;
  }
}

// Backward, in order: delta (D_i per query row), the main kernel (dk, dv or their split partials, dq_accum,
// dbias, dlogit_scale), then dq = dq_accum converted to the input dtype and, with splits, dk / dv = the sums of
// the partials.
cudaError_t launch_bwd_delta(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream);
cudaError_t launch_bwd_convert_dq(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream);
cudaError_t launch_bwd_reduce_dkv(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream);

// The last launch of this thread through launch() (launch_util.cuh): what it asked for and what CUDA answered, so
// that the host can say which kernel failed, with how much shared memory, on which device.
struct LaunchRecord {
  const void* kernel = nullptr;  // the kernel's host-side function
  dim3 grid;
  int threads = 0;
  size_t smem = 0;
  cudaError_t error = cudaSuccess;
};

inline LaunchRecord& last_launch() {
  thread_local LaunchRecord record;
  return record;
}

// Merges the split partials by their log-sum-exp into out / lse / mass (flash-decoding's second step).
cudaError_t launch_fwd_combine(const AttnFwdParams& p, DType dt, const FwdSplit& split, cudaStream_t stream);

}  // namespace avar::cuda
