// Backward kernel: FlashAttention-2's dK/dV-stationary pass with the group terms of docs/design.md ("The op").
//
// One CTA = (key block of 16·kWarps keys, kv head, split, sequence); its kWarps warps (4 or 8) own 16 keys each.
// 128-key blocks halve the fp32 dQ atomics of 64-key ones (each query row's dQ gets one sum per key block). A key
// block's work is a list of steps, one per (query head reading this kv head, query block seeing these keys); the CTA
// takes a contiguous run of it, so dK and dV of the GQA group accumulate in registers. With one split (the grid alone
// fills the GPU) the CTA takes every step and writes dK / dV once, without races; with S splits each CTA
// writes an fp32 partial and a second pass sums the S partials (so a short sequence with few kv heads still
// spreads over the multiprocessors). Per step (query head h, kBlockM query rows):
//     Sᵀ = K·Qᵀ,  dPᵀ = V·dOᵀ                           (mma, rows = this warp's keys)
//     P  = exp2(raw·gs + bs − lse2),   dP += dmass[i, g(j)]
//     dS = P·(dP − D_i),   dSg = dS·scale·γ[h, g(j)]
//     dV += Pᵀ·dO,  dK += dSgᵀ·Q                        (mma, A operands straight from the accumulators)
//     dQ += dSg·K                                       (dSg through shared memory, fp32 atomics into scratch)
// dβ[h, g] / dγ[h, g] are per-key column sums of dS (and dS·scale·raw), reduced across the quad, then across
// the CTA in shared memory, then added to global memory with one atomic per (head, group) per CTA.
#pragma once

#include "common.cuh"
#include "launch.h"
#include "launch_util.cuh"

namespace avar::cuda {

template <int kD, int kWarps_>
struct BwdConfig {
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockN = 16 * kWarps;        // keys per CTA
  static constexpr int kBlockM = bwd_step_rows(kD);  // query rows per step (launch.h says why 32 at D = 128)
  // dQ of a step: warps split its rows in 16-row slices, and the head dim when there are more warps than slices
  // (blocks of 16 columns, the last slice shorter when they do not divide evenly).
  static constexpr int kWarpsM = kBlockM / 16;
  static constexpr int kWarpsD = kWarps / kWarpsM;
  static constexpr int kDpPerWarp = (kD / 16 + kWarpsD - 1) / kWarpsD;
  static constexpr int kStride = kD + kPad;
  static constexpr int kStrideS = kBlockM + kPad;  // dS tile [key][query]
  static constexpr int kTileKV = kBlockN * kStride;
  static constexpr int kTileQ = kBlockM * kStride;
  static constexpr size_t kSmemBytes = bwd_smem_bytes(kD, kBlockM, kBlockN);
  static_assert(kBlockM % 16 == 0 && kD % 16 == 0, "tiles are made of 16×16 MMA blocks");
  static_assert(kWarpsM * kWarpsD == kWarps, "dQ slices cover the step once");
  static_assert(kBlockM <= kThreads && kBlockN <= kThreads, "one thread per row / key in the prologues");
};

template <typename T, int kD, bool kCausal, int kWarps>
__global__ void __launch_bounds__(BwdConfig<kD, kWarps>::kThreads)
    bwd_kernel(const AttnBwdParams bp, const BwdScratch scr) {
  using C = BwdConfig<kD, kWarps>;
  using Tr = ElemTraits<T>;
  constexpr int kBlockM = C::kBlockM, kBlockN = C::kBlockN, kStride = C::kStride, kStrideS = C::kStrideS;
  constexpr int kNB = kBlockM / 8;  // n8 blocks across the query rows of a step
  constexpr int kDB = kD / 8;
  const AttnFwdParams& p = bp.fwd;

  unsigned char* smem_raw = dynamic_smem();
  T* sK = reinterpret_cast<T*>(smem_raw);                            // [kBlockN][kStride]
  T* sV = sK + C::kTileKV;                                           // [kBlockN][kStride]
  T* sQ = sV + C::kTileKV;                                           // [2][kBlockM][kStride]
  T* sdO = sQ + 2 * C::kTileQ;                                       // [2][kBlockM][kStride]
  T* sdS = sdO + 2 * C::kTileQ;                                      // [kBlockN][kStrideS]  dSg, key-major
  T* sP = sdS + kBlockN * kStrideS;                                  // [kBlockN][kStrideS]  P, key-major
  float* sLse2 = reinterpret_cast<float*>(sP + kBlockN * kStrideS);  // [2][kBlockM] lse·log2e, +inf if dead
  float* sDelta = sLse2 + 2 * kBlockM;                               // [2][kBlockM]
  float* sDm = sDelta + 2 * kBlockM;                                 // [2][G][kBlockM] dmass, group-major
  float* sRed = sDm + 2 * kNumGroups * kBlockM;                      // [2][G] dβ, dγ of the current head

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
  const int n_block = blockIdx.x, b = blockIdx.z;
  const int kvh = blockIdx.y / scr.num_splits, split = blockIdx.y % scr.num_splits;
  const SeqSpan sp = seq_span(p.seq, b);
  const int n0 = n_block * kBlockN;
  if (n0 >= sp.len_k) return;
  const int rep = static_cast<int>(p.seq.heads / p.seq.kv_heads);
  const int offset = sp.len_k - sp.len_q;

  // Query blocks that see at least one key of this block (causal: i >= j − offset).
  const int m_first = kCausal ? max(0, n0 - offset) : 0;
  const int mb_begin = m_first / kBlockM;
  const int n_mb = m_first >= sp.len_q ? 0 : (sp.len_q + kBlockM - 1) / kBlockM - mb_begin;
  // Steps t = (query head t / n_mb, query block t % n_mb); this split takes [t_begin, t_end).
  const int all_steps = rep * n_mb;
  const int t_begin = static_cast<int>(static_cast<int64_t>(all_steps) * split / scr.num_splits);
  const int t_end = static_cast<int>(static_cast<int64_t>(all_steps) * (split + 1) / scr.num_splits);

  const T* k_base =
      static_cast<const T*>(p.k) + b * p.k_batch_stride + sp.k_start * p.k_row_stride + kvh * p.k_head_stride;
  const T* v_base =
      static_cast<const T*>(p.v) + b * p.v_batch_stride + sp.k_start * p.v_row_stride + kvh * p.v_head_stride;
  const int64_t H = p.seq.heads;
  const int64_t row0 = scratch_row0(p.seq, sp, b);
  const float scale = static_cast<float>(p.seq.scale);  // the kernels work in fp32
  const float scale_log2 = scale * kLog2e;
  const bool has_dmass = bp.dmass != nullptr;
  const bool want_tables = bp.dbias != nullptr || bp.dlogit_scale != nullptr;

  auto prefetch = [&](int t, int stage) {
    const int h = kvh * rep + t / n_mb;
    const int m0 = (mb_begin + t % n_mb) * kBlockM;
    const T* q_base =
        static_cast<const T*>(p.q) + b * p.q_batch_stride + sp.q_start * p.q_row_stride + h * p.q_head_stride;
    const T* do_base =
        static_cast<const T*>(bp.dout) + b * bp.do_batch_stride + sp.q_start * bp.do_row_stride + h * bp.do_head_stride;
    load_tile_async<T, kBlockM, kD, C::kThreads>(sQ + stage * C::kTileQ, q_base, p.q_row_stride, m0, sp.len_q,
                                                 static_cast<const T*>(p.q), tid);
    load_tile_async<T, kBlockM, kD, C::kThreads>(sdO + stage * C::kTileQ, do_base, bp.do_row_stride, m0, sp.len_q,
                                                 static_cast<const T*>(bp.dout), tid);
    if (tid < kBlockM) {
      const int i = m0 + tid;
      float lse2 = INFINITY, delta = 0.f;
      float dm[kNumGroups] = {0.f, 0.f, 0.f, 0.f};
      if (i < sp.len_q) {
        const int64_t row = sp.q_start + i;
        const float lse = p.lse[b * p.lse_batch_stride + row * p.lse_row_stride + h * p.lse_head_stride];
        lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;  // a dead row gets P = exp2(s − inf) = 0
        delta = scr.delta[(row0 + i) * H + h];
        if (has_dmass) {
          const float* src =
              bp.dmass + b * bp.dmass_batch_stride + row * bp.dmass_row_stride + h * bp.dmass_head_stride;
#pragma unroll
          for (int g = 0; g < kNumGroups; ++g) dm[g] = src[g];
        }
      }
      sLse2[stage * kBlockM + tid] = lse2;
      sDelta[stage * kBlockM + tid] = delta;
#pragma unroll
      for (int g = 0; g < kNumGroups; ++g) sDm[(stage * kNumGroups + g) * kBlockM + tid] = dm[g];
    }
  };

  load_tile_async<T, kBlockN, kD, C::kThreads>(sK, k_base, p.k_row_stride, n0, sp.len_k, static_cast<const T*>(p.k),
                                               tid);
  load_tile_async<T, kBlockN, kD, C::kThreads>(sV, v_base, p.v_row_stride, n0, sp.len_k, static_cast<const T*>(p.v),
                                               tid);
  if (t_begin < t_end) prefetch(t_begin, 0);
  cp_async_commit();
  if (tid < 2 * kNumGroups) sRed[tid] = 0.f;

  // A masked key's K row becomes 0 in shared memory: dQ += dS·K multiplies it by dS = 0, and 0·NaN from
  // garbage in padding would otherwise reach every query. The loop's first barrier publishes the zeros.
  cp_async_wait<0>();
  __syncthreads();
  if (tid < kBlockN && n0 + tid < sp.len_k && p.key_group != nullptr) {
    const int g = p.key_group[static_cast<int64_t>(b) * p.kg_batch_stride + (sp.k_start + n0 + tid) * p.kg_row_stride];
    if (g < 0 || g >= kNumGroups) {
      uint16_t* row = reinterpret_cast<uint16_t*>(sK + tid * kStride);
#pragma unroll
      for (int d = 0; d < kD; ++d) row[d] = 0;
    }
  }

  const int key_local[2] = {warp * 16 + gid, warp * 16 + gid + 8};  // this thread's keys within the block
  float dk[kDB][4], dv[kDB][4];
#pragma unroll
  for (int i = 0; i < kDB; ++i) {
    dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
    dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
  }
  KeyFactors kf[2];
  float sg[2] = {0.f, 0.f};     // scale·γ of this thread's keys (for dSg)
  float col_b[2] = {0.f, 0.f};  // Σ_i dS over this thread's query columns, per key
  float col_g[2] = {0.f, 0.f};  // Σ_i dS·raw
  int pending_head = -1;        // head whose dβ/dγ wait in sRed

  for (int t = t_begin; t < t_end; ++t) {
    const int stage = (t - t_begin) & 1;
    const int h = kvh * rep + t / n_mb;
    const int m0 = (mb_begin + t % n_mb) * kBlockM;
    const bool head_starts = t % n_mb == 0 || t == t_begin;
    const bool head_ends = t % n_mb == n_mb - 1 || t == t_end - 1;
    if (t + 1 < t_end) prefetch(t + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    if (pending_head >= 0 && tid < 2 * kNumGroups) {
      float* dst = tid < kNumGroups ? bp.dbias : bp.dlogit_scale;
      if (dst != nullptr) atomicAdd(dst + pending_head * kNumGroups + (tid % kNumGroups), sRed[tid]);
      sRed[tid] = 0.f;
    }
    pending_head = -1;
    if (head_starts) {
      const float* gamma_h = p.logit_scale + h * kNumGroups;
      const float* beta_h = p.bias + h * kNumGroups;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        kf[r] = key_factors(p, b, sp.k_start, n0 + key_local[r], sp.len_k, gamma_h, beta_h, scale_log2);
        sg[r] = kf[r].group >= 0 ? scale * gamma_h[kf[r].group] : 0.f;
      }
    }

    const T* sQs = sQ + stage * C::kTileQ;
    const T* sdOs = sdO + stage * C::kTileQ;
    const float* lse2 = sLse2 + stage * kBlockM;
    const float* dlt = sDelta + stage * kBlockM;

    float st[kNB][4], dpt[kNB][4];
#pragma unroll
    for (int i = 0; i < kNB; ++i) {
      st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
      dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.f;
    }
#pragma unroll
    for (int kc = 0; kc < kD / 16; ++kc) {
      uint32_t ak[4], av[4];
      ldmatrix_x4(ak, lds_pattern_a<kStride>(sK, warp * 16, kc * 16, lane));
      ldmatrix_x4(av, lds_pattern_a<kStride>(sV, warp * 16, kc * 16, lane));
#pragma unroll
      for (int np = 0; np < kNB / 2; ++np) {
        uint32_t bq[4], bo[4];
        ldmatrix_x4(bq, lds_pattern_b<kStride>(sQs, np * 16, kc * 16, lane));
        mma_16816<T>(st[2 * np], ak, bq[0], bq[1]);
        mma_16816<T>(st[2 * np + 1], ak, bq[2], bq[3]);
        ldmatrix_x4(bo, lds_pattern_b<kStride>(sdOs, np * 16, kc * 16, lane));
        mma_16816<T>(dpt[2 * np], av, bo[0], bo[1]);
        mma_16816<T>(dpt[2 * np + 1], av, bo[2], bo[3]);
      }
    }

    // P and dS in place: st <- P, dpt <- dSg.
    const bool need_mask = kCausal && (n0 + warp * 16 + 15 > m0 + offset);
    const float* dm_r[2] = {sDm + (stage * kNumGroups + max(kf[0].group, 0)) * kBlockM,
                            sDm + (stage * kNumGroups + max(kf[1].group, 0)) * kBlockM};
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int col = nb * 8 + 2 * tig + (e & 1);
        const float raw = st[nb][e];
        // P = 0 and dS = 0 without arithmetic on keys the row does not see: a NaN lse2 (a NaN row) or a
        // non-finite dP (a masked key's V) must not reach them.
        const bool visible = kf[r].group >= 0 && !(need_mask && n0 + key_local[r] > m0 + col + offset);
        const float pe = visible ? exp2f(raw * kf[r].gs + kf[r].bs - lse2[col]) : 0.f;
        float dp = dpt[nb][e];
        if (has_dmass) dp += dm_r[r][col];
        const float ds = visible ? pe * (dp - dlt[col]) : 0.f;
        col_b[r] += ds;
        col_g[r] += ds * raw;
        st[nb][e] = pe;
        dpt[nb][e] = ds * sg[r];
      }
    }

    // P and dSg (rounded to T) into key-major tiles: rows are this warp's keys, columns the step's queries. The
    // dK / dV loop below reads them back as A fragments, one 16-query slice at a time: kept in registers, the
    // fragments of every slice next to dK and dV spill at every head dim, and indexed by a rolled loop they land
    // in local memory (scripts/check_spills.sh fails on both).
#pragma unroll
    for (int kc = 0; kc < kBlockM / 16; ++kc) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int col = kc * 16 + half * 8 + 2 * tig;
        const float* p_acc = st[2 * kc + half];
        const float* s_acc = dpt[2 * kc + half];
        *reinterpret_cast<uint32_t*>(sP + key_local[0] * kStrideS + col) = Tr::pack(p_acc[0], p_acc[1]);
        *reinterpret_cast<uint32_t*>(sP + key_local[1] * kStrideS + col) = Tr::pack(p_acc[2], p_acc[3]);
        *reinterpret_cast<uint32_t*>(sdS + key_local[0] * kStrideS + col) = Tr::pack(s_acc[0], s_acc[1]);
        *reinterpret_cast<uint32_t*>(sdS + key_local[1] * kStrideS + col) = Tr::pack(s_acc[2], s_acc[3]);
      }
    }
    __syncthreads();
    // dV += Pᵀ·dO and dK += dSgᵀ·Q.
#pragma unroll 1
    for (int kc = 0; kc < kBlockM / 16; ++kc) {
      uint32_t ap[4], as[4];
      ldmatrix_x4(ap, lds_pattern_a<kStrideS>(sP, warp * 16, kc * 16, lane));
      ldmatrix_x4(as, lds_pattern_a<kStrideS>(sdS, warp * 16, kc * 16, lane));
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t bo[4], bq[4];
        ldmatrix_x4_trans(bo, lds_pattern_a<kStride>(sdOs, kc * 16, dp * 16, lane));
        mma_16816<T>(dv[2 * dp], ap, bo[0], bo[1]);
        mma_16816<T>(dv[2 * dp + 1], ap, bo[2], bo[3]);
        ldmatrix_x4_trans(bq, lds_pattern_a<kStride>(sQs, kc * 16, dp * 16, lane));
        mma_16816<T>(dk[2 * dp], as, bq[0], bq[1]);
        mma_16816<T>(dk[2 * dp + 1], as, bq[2], bq[3]);
      }
    }
    __syncthreads();

    // dQ of this step = dSg (query-major view of sdS) · K: rows [16·wm, 16·wm + 16), head-dim blocks of 16 from
    // dp_first on.
    {
      constexpr int kDpPerWarp = C::kDpPerWarp;
      const int wm = warp % C::kWarpsM;
      const int dp_first = (warp / C::kWarpsM) * kDpPerWarp;
      uint32_t ads[kBlockN / 16][4];
#pragma unroll
      for (int kc = 0; kc < kBlockN / 16; ++kc) {
        ldmatrix_x4_trans(ads[kc], lds_pattern_b<kStrideS>(sdS, kc * 16, wm * 16, lane));
      }
      const int q_row[2] = {m0 + wm * 16 + gid, m0 + wm * 16 + gid + 8};
      float* dq_row[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        dq_row[r] = scr.dq_accum + ((row0 + q_row[r]) * H + h) * kD;
      }
      // Rolled: no array is indexed by dp, and unrolled this loop's K fragments take the last registers (ptxas
      // spilled at D = 128).
#pragma unroll 1
      for (int dpi = 0; dpi < kDpPerWarp; ++dpi) {
        const int dp = dp_first + dpi;
        if (kD / 16 % C::kWarpsD != 0 && dp >= kD / 16) break;
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kc = 0; kc < kBlockN / 16; ++kc) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, lds_pattern_a<kStride>(sK, kc * 16, dp * 16, lane));
          mma_16816<T>(acc[0], ads[kc], bk[0], bk[1]);
          mma_16816<T>(acc[1], ads[kc], bk[2], bk[3]);
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int d = dp * 16 + j * 8 + 2 * tig;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            if (q_row[r] < sp.len_q) {
              atomicAdd(dq_row[r] + d, acc[j][2 * r]);
              atomicAdd(dq_row[r] + d + 1, acc[j][2 * r + 1]);
            }
          }
        }
      }
    }

    if (want_tables && head_ends) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float cb = quad_sum(col_b[r]);
        const float cg = quad_sum(col_g[r]);
        if (tig == 0 && kf[r].group >= 0) {
          atomicAdd(&sRed[kf[r].group], cb);
          atomicAdd(&sRed[kNumGroups + kf[r].group], cg * scale);
        }
        col_b[r] = 0.f;
        col_g[r] = 0.f;
      }
      pending_head = h;
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  if (pending_head >= 0 && tid < 2 * kNumGroups) {
    float* dst = tid < kNumGroups ? bp.dbias : bp.dlogit_scale;
    if (dst != nullptr) atomicAdd(dst + pending_head * kNumGroups + (tid % kNumGroups), sRed[tid]);
  }

  if (scr.num_splits > 1) {
    // [S, Tk, Hkv, D]: this split's share, summed by the reduction pass.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = n0 + key_local[r];
      if (key >= sp.len_k) continue;
      const int64_t prow = (split * p.seq.total_k + scratch_krow0(p.seq, sp, b) + key) * p.seq.kv_heads + kvh;
      float* dk_part = scr.dk_partial + prow * kD;
      float* dv_part = scr.dv_partial + prow * kD;
#pragma unroll
      for (int i = 0; i < kDB; ++i) {
        const int d = i * 8 + 2 * tig;
        *reinterpret_cast<float2*>(dk_part + d) = make_float2(dk[i][2 * r], dk[i][2 * r + 1]);
        *reinterpret_cast<float2*>(dv_part + d) = make_float2(dv[i][2 * r], dv[i][2 * r + 1]);
      }
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + key_local[r];
    if (key >= sp.len_k) continue;
    const int64_t krow = sp.k_start + key;
    T* dk_out = static_cast<T*>(bp.dk) + b * bp.dk_batch_stride + krow * bp.dk_row_stride + kvh * bp.dk_head_stride;
    T* dv_out = static_cast<T*>(bp.dv) + b * bp.dv_batch_stride + krow * bp.dv_row_stride + kvh * bp.dv_head_stride;
#pragma unroll
    for (int i = 0; i < kDB; ++i) {
      const int d = i * 8 + 2 * tig;
      *reinterpret_cast<uint32_t*>(dk_out + d) = Tr::pack(dk[i][2 * r], dk[i][2 * r + 1]);
      *reinterpret_cast<uint32_t*>(dv_out + d) = Tr::pack(dv[i][2 * r], dv[i][2 * r + 1]);
    }
  }
}

template <int kD, int kWarps>
cudaError_t launch_bwd(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream) {
  using C = BwdConfig<kD, kWarps>;
  const dim3 grid(blocks_for(p.fwd.seq.seqlen_k, C::kBlockN), static_cast<unsigned>(p.fwd.seq.kv_heads * s.num_splits),
                  static_cast<unsigned>(p.fwd.seq.batch));
  return with_dtype_causal(dt, p.fwd.seq.causal, [&](auto elem, auto causal) {
    using T = typename decltype(elem)::type;
    return launch(bwd_kernel<T, kD, decltype(causal)::value, kWarps>, grid, C::kThreads, C::kSmemBytes, stream, p, s);
  });
}

}  // namespace avar::cuda
