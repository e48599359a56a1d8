// Plain parameter blocks shared by the CPU and CUDA kernels. No torch headers: the .cu files include this.
//
// Every tensor is addressed as
//     base + b * batch_stride + (row_start(b) + i) * row_stride + h * head_stride
// where row_start(b) is cu_seqlens[b] in varlen mode (batch_stride = 0) and 0 otherwise, so one kernel
// serves both layouts. Strides are in elements. The last dimension (head dim, or group for mass) is
// contiguous.
#pragma once

#include <cstdint>

namespace avar {

constexpr int kNumGroups = 4;  // 0 other text, 1 visual, 2 system, 3 user text; -1 marks a masked key

struct SeqLayout {
  const int32_t* cu_seqlens_q = nullptr;  // [B + 1] or null (batched)
  const int32_t* cu_seqlens_k = nullptr;  // [B + 1] or null (batched)
  int64_t batch = 0;
  int64_t seqlen_q = 0;  // batched: Lq; varlen: max_seqlen_q
  int64_t seqlen_k = 0;  // batched: Lk; varlen: max_seqlen_k
  int64_t total_q = 0;   // rows of q: batched B·Lq; varlen Tq (sequences and the rows past them)
  int64_t total_k = 0;   // rows of k: batched B·Lk; varlen Tk
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  bool causal = true;
  double scale = 1.0;  // kept in double so fp64 runs (gradcheck) see the exact value
};

struct AttnFwdParams {
  SeqLayout seq;

  const void* q = nullptr;  // [B, Lq, H, D] | [Tq, H, D]
  const void* k = nullptr;  // [B, Lk, Hkv, D] | [Tk, Hkv, D]
  const void* v = nullptr;  // [B, Lk, Hkv, D] | [Tk, Hkv, D]
  void* out = nullptr;      // [B, Lq, H, D] | [Tq, H, D]
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;

  const int8_t* key_group = nullptr;  // [B, Lk] | [Tk]; null = every key is group 0
  int64_t kg_batch_stride = 0, kg_row_stride = 0;

  const float* bias = nullptr;         // [H, G] contiguous, always present (zeros by default)
  const float* logit_scale = nullptr;  // [H, G] contiguous, always present (ones by default)
  // float64 copies of the two tables, set only for float64 inputs (CPU gradcheck needs them unrounded).
  const double* bias_f64 = nullptr;
  const double* logit_scale_f64 = nullptr;

  float* lse = nullptr;  // [B, H, Lq] | [H, Tq]
  int64_t lse_batch_stride = 0, lse_row_stride = 0, lse_head_stride = 0;

  float* mass = nullptr;  // [B, H, Lq, G] | [H, Tq, G]; null when not asked
  int64_t mass_batch_stride = 0, mass_row_stride = 0, mass_head_stride = 0;
};

struct AttnBwdParams {
  AttnFwdParams fwd;  // q, k, v, out, lse, mass (read only here), groups, bias, logit scale

  const void* dout = nullptr;  // like out
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  const float* dmass = nullptr;  // like mass, or null
  int64_t dmass_batch_stride = 0, dmass_row_stride = 0, dmass_head_stride = 0;
  const float* dlse = nullptr;  // like lse, or null
  int64_t dlse_batch_stride = 0, dlse_row_stride = 0, dlse_head_stride = 0;

  void* dq = nullptr;  // like q, contiguous BSHD / THD
  void* dk = nullptr;  // like k, contiguous
  void* dv = nullptr;  // like v, contiguous
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;

  float* dbias = nullptr;         // [H, G] float32, zeroed by the caller, or null
  float* dlogit_scale = nullptr;  // [H, G] float32, zeroed by the caller, or null
};

struct KeyMassParams {
  AttnFwdParams fwd;  // q, k, lse, groups, bias, logit scale (v/out/mass unused)

  const float* query_weight = nullptr;  // [B, H, Lq] | [H, Tq], float32
  int64_t w_batch_stride = 0, w_row_stride = 0, w_head_stride = 0;

  float* key_mass = nullptr;  // [B, H, Lk] | [H, Tk], float32
  int64_t km_batch_stride = 0, km_row_stride = 0, km_head_stride = 0;
};

}  // namespace avar
