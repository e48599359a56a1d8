// Host entry points of the CUDA kernels, over the Params structs and raw device pointers. Compiled by both g++
// (cuda_dispatch.cpp) and nvcc, so it holds no torch and no device code. Every launcher returns the first CUDA
// error it met (cudaSuccess otherwise); the caller turns it into an exception.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../params.h"

namespace avar::cuda {

enum class DType { kHalf, kBFloat16 };

// Tile sizes the host side needs for scratch sizes and the decode heuristic.
constexpr int kFwdBlockM = 128;  // query rows per forward CTA
constexpr int kFwdBlockN = 64;   // keys per forward K/V tile
constexpr int kBwdBlockN = 64;   // keys per backward / key-mass CTA
constexpr int kBwdBlockM = 64;   // query rows per backward / key-mass step

// Split-KV (flash-decoding) partials, float32, indexed [split, b, h, i] with i < max_seqlen_q.
struct FwdSplit {
  int num_splits = 1;            // 1: no split, the kernel writes out / lse / mass directly
  float* out_partial = nullptr;  // [splits, B, H, Lq_max, D]
  float* lse_partial = nullptr;  // [splits, B, H, Lq_max]
  float* mass_partial = nullptr; // [splits, B, H, Lq_max, G] (only when p.mass is set)
};

struct BwdScratch {
  float* dq_accum = nullptr;  // [B, H, Lq_max, D], zeroed by the caller (the same layout batched or varlen)
  float* delta = nullptr;     // [B, H, Lq_max]: D_i = dO·O + Σ_g dmass·mass − dlse
};

// Per head dim (one instantiation file each).
cudaError_t launch_fwd_d64(const AttnFwdParams& p, DType dt, const FwdSplit& split, cudaStream_t stream);
cudaError_t launch_fwd_d80(const AttnFwdParams& p, DType dt, const FwdSplit& split, cudaStream_t stream);
cudaError_t launch_fwd_d128(const AttnFwdParams& p, DType dt, const FwdSplit& split, cudaStream_t stream);

cudaError_t launch_bwd_d64(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream);
cudaError_t launch_bwd_d80(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream);
cudaError_t launch_bwd_d128(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream);

cudaError_t launch_key_mass_d64(const KeyMassParams& p, DType dt, cudaStream_t stream);
cudaError_t launch_key_mass_d80(const KeyMassParams& p, DType dt, cudaStream_t stream);
cudaError_t launch_key_mass_d128(const KeyMassParams& p, DType dt, cudaStream_t stream);

// Backward, in order: delta (D_i per query row), the main kernel (dk, dv, dq_accum, dbias, dlogit_scale),
// then dq = dq_accum converted to the input dtype.
cudaError_t launch_bwd_delta(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream);
cudaError_t launch_bwd_convert_dq(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream);

// Merges the split partials by their log-sum-exp into out / lse / mass (flash-decoding's second step).
cudaError_t launch_fwd_combine(const AttnFwdParams& p, DType dt, const FwdSplit& split, cudaStream_t stream);

}  // namespace avar::cuda
