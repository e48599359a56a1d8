// Forward kernel: FlashAttention-2 structure with per-(head, group) logit scale and bias and per-group masses.
//
// One CTA = (query block of kBlockM rows, query head, sequence [, key split]). 8 warps, 16 query rows each.
// Q stays in shared memory; K/V tiles of kBlockN keys are double buffered through cp.async. Per tile each warp
// computes S = Q·Kᵀ with mma.sync m16n8k16, turns it into log2-domain scores with the per-key factors
// (score2 = raw · scale·γ·log2e + β·log2e, or −inf), runs the online softmax in registers, and accumulates
// O += P·V. The group masses ride on the same tensor cores: one extra 16×8 accumulator per warp receives
// P·onehot(group), whose B operand is built in registers from the tile's group ids.
#pragma once

#include "common.cuh"
#include "launch.h"
#include "launch_util.cuh"

namespace avar::cuda {

template <int kD>
struct FwdConfig {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = kFwdBlockM;  // = 16 · kWarps
  static constexpr int kBlockN = kFwdBlockN;
  static constexpr int kStride = kD + kPad;  // elements per smem row
  static constexpr int kTileQ = kBlockM * kStride;
  static constexpr int kTileKV = kBlockN * kStride;
  // Q, two K stages, two V stages (elements of 2 bytes), then per stage: group, gs, bs (4 bytes each).
  static constexpr size_t kSmemBytes = static_cast<size_t>(kTileQ + 4 * kTileKV) * 2 + 2 * kBlockN * 12;
  static_assert(kBlockM == 16 * kWarps, "one warp per 16 query rows");
  static_assert(kD % 16 == 0, "head dim must be a multiple of 16");
};

__device__ __forceinline__ uint32_t onehot_pair(bool lo, bool hi, uint16_t one) {
  return (lo ? static_cast<uint32_t>(one) : 0u) | ((hi ? static_cast<uint32_t>(one) : 0u) << 16);
}

template <typename T, int kD, bool kCausal>
__global__ void __launch_bounds__(FwdConfig<kD>::kThreads) fwd_kernel(const AttnFwdParams p, const FwdSplit split) {
  using C = FwdConfig<kD>;
  using Tr = ElemTraits<T>;
  constexpr int kBlockM = C::kBlockM, kBlockN = C::kBlockN, kStride = C::kStride;
  constexpr int kNB = kBlockN / 8;  // n8 blocks of scores per warp
  constexpr int kDB = kD / 8;       // n8 blocks of the output per warp

  unsigned char* smem_raw = dynamic_smem();
  T* sQ = reinterpret_cast<T*>(smem_raw);                   // [kBlockM][kStride]
  T* sK = sQ + C::kTileQ;                                   // [2][kBlockN][kStride]
  T* sV = sK + 2 * C::kTileKV;                              // [2][kBlockN][kStride]
  int* sG = reinterpret_cast<int*>(sV + 2 * C::kTileKV);    // [2][kBlockN] group id, −1 masked
  float* sGS = reinterpret_cast<float*>(sG + 2 * kBlockN);  // [2][kBlockN] scale·γ·log2e
  float* sBS = sGS + 2 * kBlockN;                           // [2][kBlockN] β·log2e or −inf

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest causal blocks first
  const int h = blockIdx.y;
  const int b = blockIdx.z / split.num_splits;
  const int split_idx = blockIdx.z % split.num_splits;
  const SeqSpan sp = seq_span(p.seq, b);
  const int m0 = m_block * kBlockM;
  if (m0 >= sp.len_q) return;
  const int kvh = h / static_cast<int>(p.seq.heads / p.seq.kv_heads);
  const int offset = sp.len_k - sp.len_q;  // causal: query i sees key j iff j <= i + offset

  // Keys this block can see, in tiles; a split takes a contiguous run of them.
  int n_end = sp.len_k;
  if (kCausal) n_end = min(n_end, min(m0 + kBlockM, sp.len_q) + offset);
  const int n_tiles = n_end > 0 ? (n_end + kBlockN - 1) / kBlockN : 0;
  int t_begin = 0, t_end = n_tiles;
  if (split.num_splits > 1) {
    const int per_split = (n_tiles + split.num_splits - 1) / split.num_splits;
    t_begin = min(n_tiles, split_idx * per_split);
    t_end = min(n_tiles, t_begin + per_split);
  }

  const T* q_base =
      static_cast<const T*>(p.q) + b * p.q_batch_stride + sp.q_start * p.q_row_stride + h * p.q_head_stride;
  const T* k_base =
      static_cast<const T*>(p.k) + b * p.k_batch_stride + sp.k_start * p.k_row_stride + kvh * p.k_head_stride;
  const T* v_base =
      static_cast<const T*>(p.v) + b * p.v_batch_stride + sp.k_start * p.v_row_stride + kvh * p.v_head_stride;
  const float* gamma_h = p.logit_scale + h * kNumGroups;
  const float* beta_h = p.bias + h * kNumGroups;
  const float scale_log2 = static_cast<float>(p.seq.scale) * kLog2e;  // the kernels work in fp32
  const bool want_mass = p.mass != nullptr;

  auto load_kv = [&](int t, int stage) {
    const int n0 = t * kBlockN;
    load_tile_async<T, kBlockN, kD, C::kThreads>(sK + stage * C::kTileKV, k_base, p.k_row_stride, n0, sp.len_k,
                                                 static_cast<const T*>(p.k), tid);
    load_tile_async<T, kBlockN, kD, C::kThreads>(sV + stage * C::kTileKV, v_base, p.v_row_stride, n0, sp.len_k,
                                                 static_cast<const T*>(p.v), tid);
    if (tid < kBlockN) {
      const KeyFactors f = key_factors(p, b, sp.k_start, n0 + tid, sp.len_k, gamma_h, beta_h, scale_log2);
      sG[stage * kBlockN + tid] = f.group;
      sGS[stage * kBlockN + tid] = f.gs;
      sBS[stage * kBlockN + tid] = f.bs;
    }
  };

  load_tile_async<T, kBlockM, kD, C::kThreads>(sQ, q_base, p.q_row_stride, m0, sp.len_q, static_cast<const T*>(p.q),
                                               tid);
  if (t_begin < t_end) load_kv(t_begin, 0);
  cp_async_commit();

  const int warp_row0 = m0 + warp * 16;  // first query row of this warp (within the sequence)
  const bool warp_active = warp_row0 < sp.len_q;
  const int row0 = warp_row0 + gid, row1 = row0 + 8;

  float acc_o[kDB][4];
  float acc_mass[4] = {0.f, 0.f, 0.f, 0.f};  // (row gid | gid+8) × (group 2tig, 2tig+1)
#pragma unroll
  for (int i = 0; i < kDB; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running max of score2 per row (quad-uniform)
  float l_run[2] = {0.f, 0.f};              // this thread's part of the softmax denominator
  bool live[2] = {false, false};            // this thread's columns held a visible, unmasked key of the row

  for (int t = t_begin; t < t_end; ++t) {
    const int stage = (t - t_begin) & 1;
    if (t + 1 < t_end) load_kv(t + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    if (warp_active) {
      const T* sKs = sK + stage * C::kTileKV;
      const T* sVs = sV + stage * C::kTileKV;
      const int* sGt = sG + stage * kBlockN;
      const float* sGSt = sGS + stage * kBlockN;
      const float* sBSt = sBS + stage * kBlockN;

      float s[kNB][4];
#pragma unroll
      for (int i = 0; i < kNB; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
      for (int kc = 0; kc < kD / 16; ++kc) {
        uint32_t a[4];
        ldmatrix_x4(a, lds_pattern_a<kStride>(sQ, warp * 16, kc * 16, lane));
#pragma unroll
        for (int np = 0; np < kNB / 2; ++np) {
          uint32_t bb[4];
          ldmatrix_x4(bb, lds_pattern_b<kStride>(sKs, np * 16, kc * 16, lane));
          mma_16816<T>(s[2 * np], a, bb[0], bb[1]);
          mma_16816<T>(s[2 * np + 1], a, bb[2], bb[3]);
        }
      }

      // Scores in the log2 domain, causal mask on tiles that cross this warp's diagonal.
      const int n0 = t * kBlockN;
      const bool need_mask = kCausal && (n0 + kBlockN - 1 > warp_row0 + offset);
      float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nb * 8 + 2 * tig + (e & 1);
          const bool visible = sGt[col] >= 0 && !(need_mask && n0 + col > (e < 2 ? row0 : row1) + offset);
          const float v = visible ? s[nb][e] * sGSt[col] + sBSt[col] : -INFINITY;
          live[e >> 1] = live[e >> 1] || visible;
          s[nb][e] = v;
          mx[e >> 1] = fmax_nan(mx[e >> 1], v);
        }
      }
      float mu[2], corr[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_new = quad_max(mx[r]);
        mu[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet: exp2(−inf − 0) = 0
        corr[r] = exp2f(m_run[r] - mu[r]);
        m_run[r] = m_new;
        l_run[r] *= corr[r];
      }
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pe = exp2f(s[nb][e] - mu[e >> 1]);
          s[nb][e] = pe;
          l_run[e >> 1] += pe;
        }
      }
#pragma unroll
      for (int i = 0; i < kDB; ++i) {
        acc_o[i][0] *= corr[0];
        acc_o[i][1] *= corr[0];
        acc_o[i][2] *= corr[1];
        acc_o[i][3] *= corr[1];
      }
      acc_mass[0] *= corr[0];
      acc_mass[1] *= corr[0];
      acc_mass[2] *= corr[1];
      acc_mass[3] *= corr[1];

      // O += P·V (P from the score accumulators, rounded to T); masses += P·onehot(group).
#pragma unroll
      for (int kc = 0; kc < kBlockN / 16; ++kc) {
        uint32_t a[4];
        a[0] = Tr::pack(s[2 * kc][0], s[2 * kc][1]);
        a[1] = Tr::pack(s[2 * kc][2], s[2 * kc][3]);
        a[2] = Tr::pack(s[2 * kc + 1][0], s[2 * kc + 1][1]);
        a[3] = Tr::pack(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
        for (int dp = 0; dp < kD / 16; ++dp) {
          uint32_t bb[4];
          ldmatrix_x4_trans(bb, lds_pattern_a<kStride>(sVs, kc * 16, dp * 16, lane));
          mma_16816<T>(acc_o[2 * dp], a, bb[0], bb[1]);
          mma_16816<T>(acc_o[2 * dp + 1], a, bb[2], bb[3]);
        }
        if (want_mass) {
          const int* g = sGt + kc * 16 + 2 * tig;
          const uint32_t b0 = onehot_pair(g[0] == gid, g[1] == gid, Tr::kOneBits);
          const uint32_t b1 = onehot_pair(g[8] == gid, g[9] == gid, Tr::kOneBits);
          mma_16816<T>(acc_mass, a, b0, b1);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  if (!warp_active) return;
  // Dead (no visible key in this split): out 0, lse −inf, mass 0, written as zeros (the accumulators may hold
  // 0·NaN from a masked key's V). A row that sees keys but whose running max is not finite (a NaN score, a
  // score that overflowed, or every score −inf) is NaN throughout, never a dead row.
  float l_row[2], inv[2], lse[2];
  bool alive[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_row[r] = quad_sum(l_run[r]);
    alive[r] = quad_any(live[r]);
    const bool finite = isfinite(m_run[r]);
    inv[r] = !alive[r] ? 0.f : finite ? 1.f / l_row[r] : NAN;
    lse[r] = !alive[r] ? -INFINITY : finite ? m_run[r] * kLn2 + logf(l_row[r]) : NAN;
  }
  const auto scaled = [&](float x, int r) { return alive[r] ? x * inv[r] : 0.f; };

  const int64_t B = p.seq.batch, H = p.seq.heads, Lmax = p.seq.seqlen_q;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r == 0 ? row0 : row1;
    if (row >= sp.len_q) continue;
    if (split.num_splits > 1) {
      const int64_t prow = ((static_cast<int64_t>(split_idx) * B + b) * H + h) * Lmax + row;
      float* o = split.out_partial + prow * kD;
#pragma unroll
      for (int i = 0; i < kDB; ++i) {
        const int d = i * 8 + 2 * tig;
        *reinterpret_cast<float2*>(o + d) = make_float2(scaled(acc_o[i][2 * r], r), scaled(acc_o[i][2 * r + 1], r));
      }
      if (tig == 0) split.lse_partial[prow] = lse[r];
      if (want_mass && tig < 2) {
        float* mp = split.mass_partial + prow * kNumGroups + 2 * tig;
        mp[0] = scaled(acc_mass[2 * r], r);
        mp[1] = scaled(acc_mass[2 * r + 1], r);
      }
    } else {
      const int64_t qrow = sp.q_start + row;
      T* o = static_cast<T*>(p.out) + b * p.o_batch_stride + qrow * p.o_row_stride + h * p.o_head_stride;
#pragma unroll
      for (int i = 0; i < kDB; ++i) {
        const int d = i * 8 + 2 * tig;
        *reinterpret_cast<uint32_t*>(o + d) = Tr::pack(scaled(acc_o[i][2 * r], r), scaled(acc_o[i][2 * r + 1], r));
      }
      if (tig == 0) p.lse[b * p.lse_batch_stride + qrow * p.lse_row_stride + h * p.lse_head_stride] = lse[r];
      if (want_mass && tig < 2) {
        float* mp = p.mass + b * p.mass_batch_stride + qrow * p.mass_row_stride + h * p.mass_head_stride + 2 * tig;
        mp[0] = scaled(acc_mass[2 * r], r);
        mp[1] = scaled(acc_mass[2 * r + 1], r);
      }
    }
  }
}

template <int kD>
cudaError_t launch_fwd(const AttnFwdParams& p, DType dt, const FwdSplit& split, cudaStream_t stream) {
  using C = FwdConfig<kD>;
  const dim3 grid(blocks_for(p.seq.seqlen_q, C::kBlockM), static_cast<unsigned>(p.seq.heads),
                  static_cast<unsigned>(p.seq.batch * split.num_splits));
  return with_dtype_causal(dt, p.seq.causal, [&](auto elem, auto causal) {
    using T = typename decltype(elem)::type;
    return launch(fwd_kernel<T, kD, decltype(causal)::value>, grid, C::kThreads, C::kSmemBytes, stream, p, split);
  });
}

}  // namespace avar::cuda
