// Attention received per key, key_mass[b, h, j] = Σ_i w[b, h, i] · P_ij: the dV pass of the backward with a
// scalar dO. One CTA = (key block of 64 keys, query head, sequence), 4 warps of 16 keys; it loops over the query
// blocks that see its keys, recomputes Sᵀ = K·Qᵀ with mma, P = exp2(raw·gs + bs − lse2), and sums w_i·P_ij
// per key. Each key's sum has one owner, so the result is written without atomics.
#pragma once

#include "common.cuh"
#include "launch.h"
#include "launch_util.cuh"

namespace avar::cuda {

template <int kD>
struct KeyMassConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockN = kBwdBlockN;
  static constexpr int kBlockM = kBwdBlockM;
  static constexpr int kStride = kD + kPad;
  static constexpr int kTileK = kBlockN * kStride;
  static constexpr int kTileQ = kBlockM * kStride;
  // K, two stages of Q (2-byte elements); two stages of lse2 and w.
  static constexpr size_t kSmemBytes = static_cast<size_t>(kTileK + 2 * kTileQ) * 2 + 2 * kBlockM * 2 * 4;
  static_assert(kBlockN == 16 * kWarps, "one warp per 16 keys");
};

template <typename T, int kD, bool kCausal>
__global__ void __launch_bounds__(KeyMassConfig<kD>::kThreads) key_mass_kernel(const KeyMassParams kp) {
  using C = KeyMassConfig<kD>;
  constexpr int kBlockM = C::kBlockM, kBlockN = C::kBlockN, kStride = C::kStride;
  constexpr int kNB = kBlockM / 8;
  const AttnFwdParams& p = kp.fwd;

  unsigned char* smem_raw = dynamic_smem();
  T* sK = reinterpret_cast<T*>(smem_raw);                       // [kBlockN][kStride]
  T* sQ = sK + C::kTileK;                                       // [2][kBlockM][kStride]
  float* sLse2 = reinterpret_cast<float*>(sQ + 2 * C::kTileQ);  // [2][kBlockM]
  float* sW = sLse2 + 2 * kBlockM;                              // [2][kBlockM]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
  const int n_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqSpan sp = seq_span(p.seq, b);
  const int n0 = n_block * kBlockN;
  if (n0 >= sp.len_k) return;
  const int kvh = h / static_cast<int>(p.seq.heads / p.seq.kv_heads);
  const int offset = sp.len_k - sp.len_q;
  const int m_first = kCausal ? max(0, n0 - offset) : 0;
  const int mb_begin = m_first / kBlockM;
  const int n_mb = m_first >= sp.len_q ? 0 : (sp.len_q + kBlockM - 1) / kBlockM - mb_begin;

  const T* q_base =
      static_cast<const T*>(p.q) + b * p.q_batch_stride + sp.q_start * p.q_row_stride + h * p.q_head_stride;
  const T* k_base =
      static_cast<const T*>(p.k) + b * p.k_batch_stride + sp.k_start * p.k_row_stride + kvh * p.k_head_stride;

  auto prefetch = [&](int t, int stage) {
    const int m0 = (mb_begin + t) * kBlockM;
    load_tile_async<T, kBlockM, kD, C::kThreads>(sQ + stage * C::kTileQ, q_base, p.q_row_stride, m0, sp.len_q,
                                                 static_cast<const T*>(p.q), tid);
    if (tid < kBlockM) {
      const int i = m0 + tid;
      float lse2 = INFINITY, w = 0.f;
      if (i < sp.len_q) {
        const int64_t row = sp.q_start + i;
        const float lse = p.lse[b * p.lse_batch_stride + row * p.lse_row_stride + h * p.lse_head_stride];
        lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
        w = kp.query_weight[b * kp.w_batch_stride + row * kp.w_row_stride + h * kp.w_head_stride];
      }
      sLse2[stage * kBlockM + tid] = lse2;
      sW[stage * kBlockM + tid] = w;
    }
  };

  load_tile_async<T, kBlockN, kD, C::kThreads>(sK, k_base, p.k_row_stride, n0, sp.len_k, static_cast<const T*>(p.k),
                                               tid);
  if (n_mb > 0) prefetch(0, 0);
  cp_async_commit();

  const int key_local[2] = {warp * 16 + gid, warp * 16 + gid + 8};
  KeyFactors kf[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    kf[r] = key_factors(p, b, sp.k_start, n0 + key_local[r], sp.len_k, p.logit_scale + h * kNumGroups,
                        p.bias + h * kNumGroups, static_cast<float>(p.seq.scale) * kLog2e);
  }
  float km[2] = {0.f, 0.f};

  for (int t = 0; t < n_mb; ++t) {
    const int stage = t & 1;
    const int m0 = (mb_begin + t) * kBlockM;
    if (t + 1 < n_mb) prefetch(t + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* sQs = sQ + stage * C::kTileQ;
    const float* lse2 = sLse2 + stage * kBlockM;
    const float* w = sW + stage * kBlockM;
    float st[kNB][4];
#pragma unroll
    for (int i = 0; i < kNB; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < kD / 16; ++kc) {
      uint32_t ak[4];
      ldmatrix_x4(ak, lds_pattern_a<kStride>(sK, warp * 16, kc * 16, lane));
#pragma unroll
      for (int np = 0; np < kNB / 2; ++np) {
        uint32_t bq[4];
        ldmatrix_x4(bq, lds_pattern_b<kStride>(sQs, np * 16, kc * 16, lane));
        mma_16816<T>(st[2 * np], ak, bq[0], bq[1]);
        mma_16816<T>(st[2 * np + 1], ak, bq[2], bq[3]);
      }
    }
    const bool need_mask = kCausal && (n0 + warp * 16 + 15 > m0 + offset);
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int col = nb * 8 + 2 * tig + (e & 1);
        const bool visible = kf[r].group >= 0 && !(need_mask && n0 + key_local[r] > m0 + col + offset);
        // Not exp2(−inf − lse2): a NaN lse2 (a NaN row) must not reach keys the row does not see.
        if (visible) km[r] += w[col] * exp2f(st[nb][e] * kf[r].gs + kf[r].bs - lse2[col]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(km[r]);
    const int key = n0 + key_local[r];
    if (tig == 0 && key < sp.len_k) {
      kp.key_mass[b * kp.km_batch_stride + (sp.k_start + key) * kp.km_row_stride + h * kp.km_head_stride] = total;
    }
  }
}

template <int kD>
cudaError_t launch_key_mass(const KeyMassParams& p, DType dt, cudaStream_t stream) {
  using C = KeyMassConfig<kD>;
  const dim3 grid(blocks_for(p.fwd.seq.seqlen_k, C::kBlockN), static_cast<unsigned>(p.fwd.seq.heads),
                  static_cast<unsigned>(p.fwd.seq.batch));
  return with_dtype_causal(dt, p.fwd.seq.causal, [&](auto elem, auto causal) {
    using T = typename decltype(elem)::type;
    return launch(key_mass_kernel<T, kD, decltype(causal)::value>, grid, C::kThreads, C::kSmemBytes, stream, p);
  });
}

}  // namespace avar::cuda
