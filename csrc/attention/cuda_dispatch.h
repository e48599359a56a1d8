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
#include "cuda/launch.h"
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

// The tiles a call uses, chosen from the head dim, the device's opt-in shared memory per CTA and the shape asked
// for (docs/design.md, "Tile shapes").
struct TilePlan {
  cuda::FwdShape fwd_shape = cuda::FwdShape::k8x16;
  int fwd_block_n = 64;  // keys per forward K/V tile
  size_t fwd_smem = 0;
  int bwd_warps = 4;     // 16 keys per warp: 64- or 128-key backward blocks
  int bwd_block_m = 64;  // query rows per backward step
  size_t bwd_smem = 0;
};

// Tile shape requests: kTileAuto takes the default shape; a shape that cannot fit falls back to one that does.
enum TileRequest : int { kTileAuto = 0, kTile8x16 = 1, kTile4x32 = 2 };

// The plan for `head_dim` on a device with `smem_limit` bytes of opt-in shared memory per CTA; raises when no
// tile of the head dim fits.
TilePlan plan_tiles(int64_t head_dim, int64_t smem_limit, int request);

// The plan on the current device (its opt-in limit, or the forced one) for the requested shape.
TilePlan plan_tiles_on_current_device(int64_t head_dim);

// Tests and benchmarks: the shape every call asks for (kTileAuto restores the default) and the shared-memory limit
// the plan assumes (0 = the device's own).
void set_tile_request(int request);
void set_forced_smem_limit(int64_t bytes);

// GQA packing: the query heads stacked as rows of one forward tile (1 = none) for these sizes.
int gqa_pack(int64_t heads, int64_t kv_heads, int64_t seqlen_q);

// Tests force packing: 0 the heuristic, 1 never, 2 whenever the group fits (any query length).
void set_gqa_packing(int mode);

// Key splits the forward uses for these sizes on `sm_count` multiprocessors (1 = no split): `pack` query heads per
// tile, K/V tiles of `block_n` keys.
int decode_splits(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k, int pack, int block_n,
                  int sm_count);

// What the forward uses on the current CUDA device: the forced count when set, else decode_splits with the
// current packing and tiles.
int decode_splits_on_current_device(int64_t batch, int64_t heads, int64_t kv_heads, int64_t seqlen_q, int64_t seqlen_k,
                                    int64_t head_dim);

// Tests force the split path with n >= 2 (whatever the GPU's size); 0 restores the heuristic.
void set_forced_decode_splits(int n);

// Splits of each backward key block's steps over CTAs for these sizes on `sm_count` multiprocessors (1 = none),
// with key blocks of `block_n` keys and steps of `block_m` query rows.
int backward_splits(int64_t batch, int64_t heads, int64_t kv_heads, int64_t seqlen_q, int64_t seqlen_k, int block_n,
                    int block_m, int sm_count);

// What the backward uses on the current device: the forced count when set, else backward_splits.
int backward_splits_on_current_device(int64_t batch, int64_t heads, int64_t kv_heads, int64_t seqlen_q,
                                      int64_t seqlen_k, int64_t head_dim);

// Tests force backward splits with n >= 2; 0 restores the heuristic.
void set_forced_backward_splits(int n);

}  // namespace avar::cuda_dispatch
