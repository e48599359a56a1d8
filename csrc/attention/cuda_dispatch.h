// CUDA side of the avar ops: CUDA-specific checks, scratch buffers, the current stream, the choice of the
// decode (split-KV) path, and the launch of the kernels in cuda/. Called by attention_ops.cpp after every
// generic check (dtype fp16/bf16, head dim 64/80/128, shapes, groups, cu_seqlens) has passed.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "params.h"

namespace avar::cuda_dispatch {

void attention_fwd(const AttnFwdParams& p, at::ScalarType dtype);
void attention_bwd(const AttnBwdParams& p, at::ScalarType dtype);
void attention_key_mass(const KeyMassParams& p, at::ScalarType dtype);

// Key splits the forward uses for these sizes on `sm_count` multiprocessors (1 = no split).
int decode_splits(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k, int sm_count);

// The same on the current CUDA device.
int decode_splits_on_current_device(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k);

}  // namespace avar::cuda_dispatch
