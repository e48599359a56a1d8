// Device building blocks shared by the attention kernels: element types, tensor-core MMA, ldmatrix address
// patterns, cp.async tile loads, and sequence bounds. No torch headers.
//
// Fragment layouts of mma.sync m16n8k16 (lane = 4·gid + tig, gid = lane / 4, tig = lane % 4):
//   A 16×16 (row major): reg0 = (row gid,   k 2tig..2tig+1)   reg1 = (row gid+8, k 2tig..)
//                        reg2 = (row gid,   k 2tig+8..)       reg3 = (row gid+8, k 2tig+8..)
//   B 16×8  (col major): reg0 = (k 2tig..2tig+1, col gid)     reg1 = (k 2tig+8.., col gid)
//   C 16×8  (fp32):      c0,c1 = (row gid, col 2tig..2tig+1)  c2,c3 = (row gid+8, col 2tig..)
#pragma once

#ifdef AVAR_CUDA_EMULATION
#include "emulation.h"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../params.h"
#include "launch.h"

namespace avar::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------------------
// Element types.

template <typename T>
struct ElemTraits;

template <>
struct ElemTraits<__half> {
  static constexpr uint16_t kOneBits = 0x3C00;
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static __forceinline__ float to_float(__half x) { return __half2float(x); }
  __device__ static __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct ElemTraits<__nv_bfloat16> {
  static constexpr uint16_t kOneBits = 0x3F80;
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

#ifdef AVAR_CUDA_EMULATION
inline void emulated_mma(cuda_emulation::WarpOp op, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint32_t in[cuda_emulation::kMaxIn] = {a[0], a[1], a[2], a[3], b0, b1};
  std::memcpy(in + 6, c, sizeof(c));
  uint32_t out[cuda_emulation::kMaxOut];
  cuda_emulation::warp_op(op, in, out);
  std::memcpy(c, out, sizeof(c));
}

inline void emulated_ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans) {
  uint32_t in[cuda_emulation::kMaxIn] = {addr};
  cuda_emulation::warp_op(trans ? cuda_emulation::WarpOp::kLdmatrixTrans : cuda_emulation::WarpOp::kLdmatrix, in, r);
}
#endif

// D (16×8 fp32) += A (16×16) · B (16×8), both operands in T.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
#ifdef AVAR_CUDA_EMULATION
  emulated_mma(cuda_emulation::WarpOp::kMmaBf16, c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef AVAR_CUDA_EMULATION
  emulated_mma(cuda_emulation::WarpOp::kMmaF16, c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Shared memory: tiles are row major with rows padded by kPad = 8 elements (16 bytes, launch.h), so the 8 row
// addresses of one ldmatrix fall in 8 distinct 4-bank groups for row widths 64, 80 and 128.

// The CTA's dynamic shared memory (the launch sets its size).
__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef AVAR_CUDA_EMULATION
  return cuda_emulation::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
#endif
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
#ifdef AVAR_CUDA_EMULATION
  return cuda_emulation::smem_offset(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#ifdef AVAR_CUDA_EMULATION
  emulated_ldmatrix(r, addr, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#ifdef AVAR_CUDA_EMULATION
  emulated_ldmatrix(r, addr, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// The four 8×8 matrices of one ldmatrix.x4 are addressed by lanes 8m..8m+7 (m = lane / 8). Two patterns:
//   pattern A: matrix m covers rows row0 + (m&1)·8 .. +7, cols col0 + (m>>1)·8 .. +7
//   pattern B: matrix m covers rows row0 + (m>>1)·8 .. +7, cols col0 + (m&1)·8 .. +7
// Uses (S = row-major smem tile, [r][c]):
//   A operand from S[m][k], no trans, pattern A        -> r[0..3] = A regs
//   A operand from S[k][m], trans, pattern B           -> r[0..3] = A regs
//   B operand (two n8 blocks) from S[n][k], no trans, pattern B -> {r0,r1} = n block n0, {r2,r3} = n0 + 8
//   B operand (two n8 blocks) from S[k][n], trans, pattern A    -> {r0,r1} = n block n0, {r2,r3} = n0 + 8
template <int kStride>
__device__ __forceinline__ uint32_t lds_pattern_a(const void* tile, int row0, int col0, int lane) {
  const int row = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int col = col0 + (lane >> 4) * 8;
  return smem_addr(static_cast<const uint16_t*>(tile) + row * kStride + col);
}

template <int kStride>
__device__ __forceinline__ uint32_t lds_pattern_b(const void* tile, int row0, int col0, int lane) {
  const int row = row0 + (lane & 7) + (lane >> 4) * 8;
  const int col = col0 + ((lane >> 3) & 1) * 8;
  return smem_addr(static_cast<const uint16_t*>(tile) + row * kStride + col);
}

// ---------------------------------------------------------------------------------------------------------
// cp.async: 16-byte copies global -> shared; `valid == false` writes zeros and reads nothing.

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#ifdef AVAR_CUDA_EMULATION
  cuda_emulation::cp_async_16(smem, gmem, valid);
#else
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef AVAR_CUDA_EMULATION
  cuda_emulation::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef AVAR_CUDA_EMULATION
  cuda_emulation::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// Loads rows [row0, row0 + kRows) of a [len, kD] row-strided matrix into a padded smem tile; rows at or past
// `len` become zeros. `fallback` is any valid global address (read by nothing, named so that no out of bound
// address is ever formed for a masked row).
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile_async(T* smem, const T* base, int64_t row_stride, int row0, int len,
                                                const T* fallback, int tid) {
  constexpr int kChunksPerRow = kD * static_cast<int>(sizeof(T)) / 16;
  constexpr int kChunks = kRows * kChunksPerRow;
  constexpr int kElemsPerChunk = 16 / static_cast<int>(sizeof(T));
#pragma unroll 1
  for (int it = 0; it < (kChunks + kThreads - 1) / kThreads; ++it) {
    const int c = tid + it * kThreads;
    if (kChunks % kThreads != 0 && c >= kChunks) break;
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * kElemsPerChunk;
    const bool valid = row0 + r < len;
    const T* src = valid ? base + static_cast<int64_t>(row0 + r) * row_stride + col : fallback;
    cp_async_16(smem + r * (kD + kPad) + col, src, valid);
  }
}

// Loads packed query rows [row0, row0 + kRows) into a padded smem tile: packed row r is query r / pack of head
// r % pack (heads counted from `base`'s head), so the query heads of a GQA group share one tile; pack = 1 is
// load_tile_async. Rows at or past `rows` (= len · pack) become zeros.
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_packed_rows_async(T* smem, const T* base, int64_t row_stride, int64_t head_stride,
                                                       int pack, int row0, int rows, const T* fallback, int tid) {
  constexpr int kChunksPerRow = kD * static_cast<int>(sizeof(T)) / 16;
  constexpr int kChunks = kRows * kChunksPerRow;
  constexpr int kElemsPerChunk = 16 / static_cast<int>(sizeof(T));
#pragma unroll 1
  for (int it = 0; it < (kChunks + kThreads - 1) / kThreads; ++it) {
    const int c = tid + it * kThreads;
    if (kChunks % kThreads != 0 && c >= kChunks) break;
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * kElemsPerChunk;
    const int pr = row0 + r;
    const bool valid = pr < rows;
    const T* src =
        valid ? base + static_cast<int64_t>(pr / pack) * row_stride + (pr % pack) * head_stride + col : fallback;
    cp_async_16(smem + r * (kD + kPad) + col, src, valid);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Sequences: where sequence b starts in the row dimension of q / k and how long it is.

struct SeqSpan {
  int64_t q_start, k_start;
  int len_q, len_k;
};

__device__ __forceinline__ SeqSpan seq_span(const SeqLayout& s, int b) {
  SeqSpan r;
  if (s.cu_seqlens_q != nullptr) {
    r.q_start = s.cu_seqlens_q[b];
    r.k_start = s.cu_seqlens_k[b];
    r.len_q = s.cu_seqlens_q[b + 1] - s.cu_seqlens_q[b];
    r.len_k = s.cu_seqlens_k[b + 1] - s.cu_seqlens_k[b];
  } else {
    r.q_start = 0;
    r.k_start = 0;
    r.len_q = static_cast<int>(s.seqlen_q);
    r.len_k = static_cast<int>(s.seqlen_k);
  }
  return r;
}

// First row of sequence b in the backward's packed scratch (dq_accum [Tq, H, D], delta [Tq, H]).
__device__ __forceinline__ int64_t scratch_row0(const SeqLayout& s, const SeqSpan& sp, int b) {
  return s.cu_seqlens_q != nullptr ? sp.q_start : static_cast<int64_t>(b) * s.seqlen_q;
}

// First row of sequence b in the backward's packed key scratch (dk / dv partials [S, Tk, Hkv, D]).
__device__ __forceinline__ int64_t scratch_krow0(const SeqLayout& s, const SeqSpan& sp, int b) {
  return s.cu_seqlens_k != nullptr ? sp.k_start : static_cast<int64_t>(b) * s.seqlen_k;
}

// Per-key factors in the log2 domain: score2 = raw · gs + bs, raw = q·k. A masked key (group −1, or past the
// end of the sequence) has group −1, gs = 0 and bs = −inf; the kernels test the group and never compute its
// score, since raw·0 + (−inf) is NaN when the key's K holds NaN or inf.
struct KeyFactors {
  int group;
  float gs, bs;
};

__device__ __forceinline__ KeyFactors key_factors(const AttnFwdParams& p, int b, int64_t k_start, int j, int len_k,
                                                  const float* gamma_h, const float* beta_h, float scale_log2) {
  KeyFactors f{-1, 0.f, -INFINITY};
  if (j < len_k) {
    int g = 0;
    if (p.key_group != nullptr) {
      g = p.key_group[static_cast<int64_t>(b) * p.kg_batch_stride + (k_start + j) * p.kg_row_stride];
    }
    // Checked on the host to lie in −1..G−1; anything else is treated as masked rather than read out of bounds.
    if (g >= 0 && g < kNumGroups) {
      f.group = g;
      f.gs = scale_log2 * gamma_h[g];
      f.bs = beta_h[g] * kLog2e;
    }
  }
  return f;
}

// max that keeps a NaN from either side: fmaxf(m, NaN) is m, which would pass a NaN score off as a dead row.
__device__ __forceinline__ float fmax_nan(float a, float b) {
  return (a != a || a > b) ? a : b;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmax_nan(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmax_nan(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ bool quad_any(bool x) {
  int v = x ? 1 : 0;
  v |= __shfl_xor_sync(0xffffffffu, v, 1);
  v |= __shfl_xor_sync(0xffffffffu, v, 2);
  return v != 0;
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace avar::cuda
