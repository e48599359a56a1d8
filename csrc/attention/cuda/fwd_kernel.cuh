// Forward kernel: FlashAttention-2 structure with per-(head, group) logit scale and bias and per-group masses.
//
// One CTA = (query block of kBlockM packed rows, group of `pack` query heads, sequence [, key split]). Packed row
// r is query r / pack of head r % pack of the group: with pack = 1 a tile holds 128 queries of one head; in
// decode and short chunks (cuda_dispatch.cpp) it holds the query heads that share a kv head, so each K/V tile is
// read once for the whole GQA group. The warps own kRowsPerWarp rows each (16 or 32, FwdShape). Q stays in
// shared memory; K/V tiles of kBlockN keys are double buffered through cp.async. Per tile each warp computes
// S = Q·Kᵀ with mma.sync m16n8k16 (each K fragment feeds the MMAs of all its row blocks), turns it into
// log2-domain scores with the row's head table (score2 = raw · scale·γ·log2e + β·log2e, or −inf), runs the
// online softmax in registers, and accumulates O += P·V. The group masses ride on the same tensor cores: one
// extra 16×8 accumulator per row block receives P·onehot(group), whose B operand is built in registers from the
// tile's group ids.
#pragma once

#include "common.cuh"
#include "launch.h"
#include "launch_util.cuh"

namespace avar::cuda {

template <int kD, FwdShape kShape, int kBlockN_>
struct FwdConfig {
  static constexpr int kWarps = kShape == FwdShape::k8x16 ? 8 : 4;
  static constexpr int kRowsPerWarp = kShape == FwdShape::k8x16 ? 16 : 32;
  static constexpr int kMF = kRowsPerWarp / 16;  // m16 row blocks per warp
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = kWarps * kRowsPerWarp;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStride = kD + kPad;  // elements per smem row
  static constexpr int kTileQ = kBlockM * kStride;
  static constexpr int kTileKV = kBlockN * kStride;
  static constexpr size_t kSmemBytes = fwd_smem_bytes(kD, kBlockM, kBlockN);
  static_assert(kBlockM == kFwdBlockM, "the host sizes grids and splits with kFwdBlockM");
  static_assert(kD % 16 == 0 && kBlockN % 16 == 0, "tiles are made of 16×16 MMA blocks");
  static_assert(kBlockN <= kThreads, "one thread per key writes the tile's groups");
};

// x, computed where it stands: the compiler cannot hoist what depends on it out of the loop around it.
__device__ __forceinline__ int opaque_int(int x) {
#ifdef AVAR_CUDA_EMULATION
  return x;
#else
  int r;
  asm volatile("mov.b32 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
#endif
}

// A shared-memory load the compiler issues where it stands: hoisted ahead of the scores (as plain loads are, for
// every score of every row at once) the table entries would take more registers than the accumulators leave.
__device__ __forceinline__ float2 lds_float2(const float* p) {
#ifdef AVAR_CUDA_EMULATION
  return *reinterpret_cast<const float2*>(p);
#else
  float2 r;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(r.x), "=f"(r.y) : "r"(smem_addr(p)));
  return r;
#endif
}

__device__ __forceinline__ uint32_t onehot_pair(bool lo, bool hi, uint16_t one) {
  return (lo ? static_cast<uint32_t>(one) : 0u) | ((hi ? static_cast<uint32_t>(one) : 0u) << 16);
}

template <typename T, int kD, bool kCausal, FwdShape kShape, int kBlockN_>
__global__ void __launch_bounds__(FwdConfig<kD, kShape, kBlockN_>::kThreads)
    fwd_kernel(const AttnFwdParams p, const FwdSplit split, const int pack) {
  using C = FwdConfig<kD, kShape, kBlockN_>;
  using Tr = ElemTraits<T>;
  constexpr int kBlockM = C::kBlockM, kBlockN = C::kBlockN, kStride = C::kStride, kMF = C::kMF;
  constexpr int kNB = kBlockN / 8;  // n8 blocks of scores per row block
  constexpr int kDB = kD / 8;       // n8 blocks of the output per row block

  unsigned char* smem_raw = dynamic_smem();
  T* sQ = reinterpret_cast<T*>(smem_raw);                    // [kBlockM][kStride]
  T* sK = sQ + C::kTileQ;                                    // [2][kBlockN][kStride]
  T* sV = sK + 2 * C::kTileKV;                               // [2][kBlockN][kStride]
  int* sG = reinterpret_cast<int*>(sV + 2 * C::kTileKV);     // [2][kBlockN] group id, −1 masked
  float* sTab = reinterpret_cast<float*>(sG + 2 * kBlockN);  // [pack][G][2] (scale·γ·log2e, β·log2e) per head

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest causal blocks first
  const int head0 = blockIdx.y * pack;             // first query head of this CTA's group
  const int b = blockIdx.z / split.num_splits;
  const int split_idx = blockIdx.z % split.num_splits;
  const SeqSpan sp = seq_span(p.seq, b);
  const int rows = sp.len_q * pack;  // packed rows of this sequence
  const int m0 = m_block * kBlockM;
  if (m0 >= rows) return;
  const int kvh = head0 / static_cast<int>(p.seq.heads / p.seq.kv_heads);
  const int offset = sp.len_k - sp.len_q;  // causal: query i sees key j iff j <= i + offset

  // Keys this block can see, in tiles; a split takes a contiguous run of them.
  int n_end = sp.len_k;
  if (kCausal) n_end = min(n_end, (min(m0 + kBlockM, rows) - 1) / pack + 1 + offset);
  const int n_tiles = n_end > 0 ? (n_end + kBlockN - 1) / kBlockN : 0;
  int t_begin = 0, t_end = n_tiles;
  if (split.num_splits > 1) {
    const int per_split = (n_tiles + split.num_splits - 1) / split.num_splits;
    t_begin = min(n_tiles, split_idx * per_split);
    t_end = min(n_tiles, t_begin + per_split);
  }

  const T* q_base =
      static_cast<const T*>(p.q) + b * p.q_batch_stride + sp.q_start * p.q_row_stride + head0 * p.q_head_stride;
  const T* k_base =
      static_cast<const T*>(p.k) + b * p.k_batch_stride + sp.k_start * p.k_row_stride + kvh * p.k_head_stride;
  const T* v_base =
      static_cast<const T*>(p.v) + b * p.v_batch_stride + sp.k_start * p.v_row_stride + kvh * p.v_head_stride;
  const float scale_log2 = static_cast<float>(p.seq.scale) * kLog2e;  // the kernels work in fp32
  const bool want_mass = p.mass != nullptr;

  auto load_kv = [&](int t, int stage) {
    const int n0 = t * kBlockN;
    load_tile_async<T, kBlockN, kD, C::kThreads>(sK + stage * C::kTileKV, k_base, p.k_row_stride, n0, sp.len_k,
                                                 static_cast<const T*>(p.k), tid);
    load_tile_async<T, kBlockN, kD, C::kThreads>(sV + stage * C::kTileKV, v_base, p.v_row_stride, n0, sp.len_k,
                                                 static_cast<const T*>(p.v), tid);
    if (tid < kBlockN) {
      const int j = n0 + tid;
      int g = -1;
      if (j < sp.len_k) {
        g = p.key_group == nullptr
                ? 0
                : p.key_group[static_cast<int64_t>(b) * p.kg_batch_stride + (sp.k_start + j) * p.kg_row_stride];
        // Checked on the host to lie in −1..G−1; anything else is treated as masked rather than read out of bounds.
        if (g < 0 || g >= kNumGroups) g = -1;
      }
      sG[stage * kBlockN + tid] = g;
    }
  };

  load_packed_rows_async<T, kBlockM, kD, C::kThreads>(sQ, q_base, p.q_row_stride, p.q_head_stride, pack, m0, rows,
                                                      static_cast<const T*>(p.q), tid);
  if (t_begin < t_end) load_kv(t_begin, 0);
  cp_async_commit();

  const int warp_row0 = m0 + warp * C::kRowsPerWarp;  // first packed row of this warp
  const bool warp_active = warp_row0 < rows;
  const int warp_q0 = warp_row0 / pack;  // its first (smallest) query position
  // The packed heads' tables in the log2 domain, published by the loop's first barrier.
  if (tid < pack * kNumGroups) {
    sTab[2 * tid] = scale_log2 * p.logit_scale[head0 * kNumGroups + tid];
    sTab[2 * tid + 1] = p.bias[head0 * kNumGroups + tid] * kLog2e;
  }

  float acc_o[kMF][kDB][4];
  float acc_mass[kMF][4];              // (row gid | gid+8) × (group 2tig, 2tig+1)
  float m_run[kMF][2], l_run[kMF][2];  // running max of score2 per row (quad-uniform); this thread's denominator
  bool live[kMF][2];                   // this thread's columns held a visible, unmasked key of the row
#pragma unroll
  for (int f = 0; f < kMF; ++f) {
#pragma unroll
    for (int i = 0; i < kDB; ++i) acc_o[f][i][0] = acc_o[f][i][1] = acc_o[f][i][2] = acc_o[f][i][3] = 0.f;
    acc_mass[f][0] = acc_mass[f][1] = acc_mass[f][2] = acc_mass[f][3] = 0.f;
    m_run[f][0] = m_run[f][1] = -INFINITY;
    l_run[f][0] = l_run[f][1] = 0.f;
    live[f][0] = live[f][1] = false;
  }

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

      float s[kMF][kNB][4];
#pragma unroll
      for (int f = 0; f < kMF; ++f) {
#pragma unroll
        for (int i = 0; i < kNB; ++i) s[f][i][0] = s[f][i][1] = s[f][i][2] = s[f][i][3] = 0.f;
      }
#pragma unroll
      for (int kc = 0; kc < kD / 16; ++kc) {
        uint32_t a[kMF][4];
#pragma unroll
        for (int f = 0; f < kMF; ++f) {
          ldmatrix_x4(a[f], lds_pattern_a<kStride>(sQ, warp * C::kRowsPerWarp + f * 16, kc * 16, lane));
        }
#pragma unroll
        for (int np = 0; np < kNB / 2; ++np) {
          uint32_t bb[4];
          ldmatrix_x4(bb, lds_pattern_b<kStride>(sKs, np * 16, kc * 16, lane));
#pragma unroll
          for (int f = 0; f < kMF; ++f) {
            mma_16816<T>(s[f][2 * np], a[f], bb[0], bb[1]);
            mma_16816<T>(s[f][2 * np + 1], a[f], bb[2], bb[3]);
          }
        }
      }

      // Scores in the log2 domain, causal mask on tiles that cross this warp's diagonal. This thread's packed rows
      // (row block f, half r: rows gid and gid + 8) give their query positions and heads; recomputed per tile
      // (opaque_int keeps them out of registers between tiles, where the accumulators need every one).
      const int thread_row0 = opaque_int(warp_row0 + gid);
      int q_of[kMF][2], tab_of[kMF][2];
#pragma unroll
      for (int f = 0; f < kMF; ++f) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int pr = thread_row0 + f * 16 + 8 * r;
          q_of[f][r] = pr / pack;
          tab_of[f][r] = (pr - q_of[f][r] * pack) * kNumGroups;
        }
      }
      const int n0 = t * kBlockN;
      const bool need_mask = kCausal && (n0 + kBlockN - 1 > warp_q0 + offset);
      // P of each row block as MMA A fragments (rounded to T), packed as soon as the block's softmax is done so that
      // its fp32 scores die before the next block's.
      uint32_t pa[kMF][kBlockN / 16][4];
#pragma unroll
      for (int f = 0; f < kMF; ++f) {
        float corr[2];
        float mx[2] = {m_run[f][0], m_run[f][1]};
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            const int col = nb * 8 + 2 * tig + (e & 1);
            const int g = sGt[col];
            const bool visible = g >= 0 && !(need_mask && n0 + col > q_of[f][r] + offset);
            float v = -INFINITY;
            if (visible) {
              const float2 t = lds_float2(sTab + 2 * (tab_of[f][r] + g));
              v = s[f][nb][e] * t.x + t.y;
            }
            live[f][r] = live[f][r] || visible;
            s[f][nb][e] = v;
            mx[r] = fmax_nan(mx[r], v);
          }
        }
        float mu[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float m_new = quad_max(mx[r]);
          mu[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet: exp2(−inf − 0) = 0
          corr[r] = exp2f(m_run[f][r] - mu[r]);
          m_run[f][r] = m_new;
          l_run[f][r] *= corr[r];
        }
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float pe = exp2f(s[f][nb][e] - mu[e >> 1]);
            s[f][nb][e] = pe;
            l_run[f][e >> 1] += pe;
          }
        }
#pragma unroll
        for (int kc = 0; kc < kBlockN / 16; ++kc) {
          pa[f][kc][0] = Tr::pack(s[f][2 * kc][0], s[f][2 * kc][1]);
          pa[f][kc][1] = Tr::pack(s[f][2 * kc][2], s[f][2 * kc][3]);
          pa[f][kc][2] = Tr::pack(s[f][2 * kc + 1][0], s[f][2 * kc + 1][1]);
          pa[f][kc][3] = Tr::pack(s[f][2 * kc + 1][2], s[f][2 * kc + 1][3]);
        }
#pragma unroll
        for (int i = 0; i < kDB; ++i) {
          acc_o[f][i][0] *= corr[0];
          acc_o[f][i][1] *= corr[0];
          acc_o[f][i][2] *= corr[1];
          acc_o[f][i][3] *= corr[1];
        }
        acc_mass[f][0] *= corr[0];
        acc_mass[f][1] *= corr[0];
        acc_mass[f][2] *= corr[1];
        acc_mass[f][3] *= corr[1];
      }

      // O += P·V (each V fragment feeds every row block); masses += P·onehot(group).
#pragma unroll
      for (int kc = 0; kc < kBlockN / 16; ++kc) {
#pragma unroll
        for (int dp = 0; dp < kD / 16; ++dp) {
          uint32_t bb[4];
          ldmatrix_x4_trans(bb, lds_pattern_a<kStride>(sVs, kc * 16, dp * 16, lane));
#pragma unroll
          for (int f = 0; f < kMF; ++f) {
            mma_16816<T>(acc_o[f][2 * dp], pa[f][kc], bb[0], bb[1]);
            mma_16816<T>(acc_o[f][2 * dp + 1], pa[f][kc], bb[2], bb[3]);
          }
        }
        if (want_mass) {
          const int* g = sGt + kc * 16 + 2 * tig;
          const uint32_t b0 = onehot_pair(g[0] == gid, g[1] == gid, Tr::kOneBits);
          const uint32_t b1 = onehot_pair(g[8] == gid, g[9] == gid, Tr::kOneBits);
#pragma unroll
          for (int f = 0; f < kMF; ++f) mma_16816<T>(acc_mass[f], pa[f][kc], b0, b1);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  if (!warp_active) return;
  const int64_t B = p.seq.batch, H = p.seq.heads, Lmax = p.seq.seqlen_q;
#pragma unroll
  for (int f = 0; f < kMF; ++f) {
    // Dead (no visible key in this split): out 0, lse −inf, mass 0, written as zeros (the accumulators may hold
    // 0·NaN from a masked key's V). A row that sees keys but whose running max is not finite (a NaN score, a
    // score that overflowed, or every score −inf) is NaN throughout, never a dead row.
    float inv[2], lse[2];
    bool alive[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l_row = quad_sum(l_run[f][r]);
      alive[r] = quad_any(live[f][r]);
      const bool finite = isfinite(m_run[f][r]);
      inv[r] = !alive[r] ? 0.f : finite ? 1.f / l_row : NAN;
      lse[r] = !alive[r] ? -INFINITY : finite ? m_run[f][r] * kLn2 + logf(l_row) : NAN;
    }
    const auto scaled = [&](float x, int r) { return alive[r] ? x * inv[r] : 0.f; };

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int pr = warp_row0 + f * 16 + gid + 8 * r;
      if (pr >= rows) continue;
      const int row = pr / pack;
      const int h = head0 + pr % pack;
      if (split.num_splits > 1) {
        const int64_t prow = ((static_cast<int64_t>(split_idx) * B + b) * H + h) * Lmax + row;
        float* o = split.out_partial + prow * kD;
#pragma unroll
        for (int i = 0; i < kDB; ++i) {
          const int d = i * 8 + 2 * tig;
          *reinterpret_cast<float2*>(o + d) =
              make_float2(scaled(acc_o[f][i][2 * r], r), scaled(acc_o[f][i][2 * r + 1], r));
        }
        if (tig == 0) split.lse_partial[prow] = lse[r];
        if (want_mass && tig < 2) {
          float* mp = split.mass_partial + prow * kNumGroups + 2 * tig;
          mp[0] = scaled(acc_mass[f][2 * r], r);
          mp[1] = scaled(acc_mass[f][2 * r + 1], r);
        }
      } else {
        const int64_t qrow = sp.q_start + row;
        T* o = static_cast<T*>(p.out) + b * p.o_batch_stride + qrow * p.o_row_stride + h * p.o_head_stride;
#pragma unroll
        for (int i = 0; i < kDB; ++i) {
          const int d = i * 8 + 2 * tig;
          *reinterpret_cast<uint32_t*>(o + d) =
              Tr::pack(scaled(acc_o[f][i][2 * r], r), scaled(acc_o[f][i][2 * r + 1], r));
        }
        if (tig == 0) p.lse[b * p.lse_batch_stride + qrow * p.lse_row_stride + h * p.lse_head_stride] = lse[r];
        if (want_mass && tig < 2) {
          float* mp = p.mass + b * p.mass_batch_stride + qrow * p.mass_row_stride + h * p.mass_head_stride + 2 * tig;
          mp[0] = scaled(acc_mass[f][2 * r], r);
          mp[1] = scaled(acc_mass[f][2 * r + 1], r);
        }
      }
    }
  }
}

template <int kD, FwdShape kShape, int kBlockN>
cudaError_t launch_fwd(const AttnFwdParams& p, DType dt, const FwdSplit& split, int pack, cudaStream_t stream) {
  using C = FwdConfig<kD, kShape, kBlockN>;
  const dim3 grid(blocks_for(p.seq.seqlen_q * pack, C::kBlockM), static_cast<unsigned>(p.seq.heads / pack),
                  static_cast<unsigned>(p.seq.batch * split.num_splits));
  if constexpr (kShape == FwdShape::k4x32) {
    // Causal only: without the mask ptxas schedules this shape past 255 registers and spills; the host sends
    // non-causal calls to 8 × 16.
    if (!p.seq.causal) return cudaErrorInvalidValue;
    return with_dtype(dt, [&](auto elem) {
      using T = typename decltype(elem)::type;
      return launch(fwd_kernel<T, kD, true, kShape, kBlockN>, grid, C::kThreads, C::kSmemBytes, stream, p, split, pack);
    });
  } else {
    return with_dtype_causal(dt, p.seq.causal, [&](auto elem, auto causal) {
      using T = typename decltype(elem)::type;
      return launch(fwd_kernel<T, kD, decltype(causal)::value, kShape, kBlockN>, grid, C::kThreads, C::kSmemBytes,
                    stream, p, split, pack);
    });
  }
}

// One forward tile (bf16 and fp16; causal and not for 8 × 16, causal for 4 × 32).
#define AVAR_INSTANTIATE_FWD(D, SHAPE, N)                                                                   \
  template cudaError_t launch_fwd<D, FwdShape::SHAPE, N>(const AttnFwdParams&, DType, const FwdSplit&, int, \
                                                         cudaStream_t);

}  // namespace avar::cuda
