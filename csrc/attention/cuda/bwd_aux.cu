// The light passes around the backward kernel: D_i before it; after it, dq's conversion from fp32 and the sum of
// the dk / dv split partials.
#include "common.cuh"
#include "launch.h"
#include "launch_util.cuh"

namespace avar::cuda {
namespace {

constexpr int kDeltaWarps = 4;
constexpr int kDeltaRowsPerWarp = 8;
constexpr int kConvertWarps = 8;

// D_i = dO_i·O_i + Σ_g dmass[i, g]·mass[i, g] − dlse_i, one warp per (row, head). Rows past the sequence are
// not written: the backward kernel never reads them.
template <typename T>
__global__ void __launch_bounds__(kDeltaWarps * 32) delta_kernel(const AttnBwdParams bp, const BwdScratch scr) {
  using Tr = ElemTraits<T>;
  const AttnFwdParams& p = bp.fwd;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqSpan sp = seq_span(p.seq, b);
  const int D = static_cast<int>(p.seq.head_dim);
  const int64_t H = p.seq.heads, row0 = scratch_row0(p.seq, sp, b);
  for (int k = 0; k < kDeltaRowsPerWarp; ++k) {
    const int i = (blockIdx.x * kDeltaWarps + warp) * kDeltaRowsPerWarp + k;
    if (i >= sp.len_q) break;
    const int64_t row = sp.q_start + i;
    const T* o = static_cast<const T*>(p.out) + b * p.o_batch_stride + row * p.o_row_stride + h * p.o_head_stride;
    const T* dout =
        static_cast<const T*>(bp.dout) + b * bp.do_batch_stride + row * bp.do_row_stride + h * bp.do_head_stride;
    float acc = 0.f;
    for (int d = lane; d < D; d += 32) acc += Tr::to_float(o[d]) * Tr::to_float(dout[d]);
    if (bp.dmass != nullptr && lane < kNumGroups) {
      const float dm =
          bp.dmass[b * bp.dmass_batch_stride + row * bp.dmass_row_stride + h * bp.dmass_head_stride + lane];
      const float m = p.mass[b * p.mass_batch_stride + row * p.mass_row_stride + h * p.mass_head_stride + lane];
      acc += dm * m;
    }
    if (bp.dlse != nullptr && lane == 0) {
      acc -= bp.dlse[b * bp.dlse_batch_stride + row * bp.dlse_row_stride + h * bp.dlse_head_stride];
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) scr.delta[(row0 + i) * H + h] = acc;
  }
}

// dq[b, i, h, :] = dq_accum[packed row of (b, i), h, :] for every row of every sequence; one warp per (row, head).
template <typename T>
__global__ void __launch_bounds__(kConvertWarps * 32) convert_dq_kernel(const AttnBwdParams bp, const BwdScratch scr) {
  using Tr = ElemTraits<T>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqSpan sp = seq_span(bp.fwd.seq, b);
  const int i = blockIdx.x * kConvertWarps + warp;
  if (i >= sp.len_q) return;
  const int D = static_cast<int>(bp.fwd.seq.head_dim);
  const int64_t H = bp.fwd.seq.heads;
  const float* src = scr.dq_accum + ((scratch_row0(bp.fwd.seq, sp, b) + i) * H + h) * D;
  T* dst =
      static_cast<T*>(bp.dq) + b * bp.dq_batch_stride + (sp.q_start + i) * bp.dq_row_stride + h * bp.dq_head_stride;
  for (int d = lane; d < D; d += 32) dst[d] = Tr::from_float(src[d]);
}

// dk[b, j, kvh, :] = Σ_s dk_partial[s, packed row of (b, j), kvh, :] (and dv likewise) for every key of every
// sequence; one warp per (key row, kv head). Rows past the sequences are left as the caller set them.
template <typename T>
__global__ void __launch_bounds__(kConvertWarps * 32) reduce_dkv_kernel(const AttnBwdParams bp, const BwdScratch scr) {
  using Tr = ElemTraits<T>;
  const SeqLayout& s = bp.fwd.seq;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const SeqSpan sp = seq_span(s, b);
  const int j = blockIdx.x * kConvertWarps + warp;
  if (j >= sp.len_k) return;
  const int D = static_cast<int>(s.head_dim);
  const int64_t split_stride = s.total_k * s.kv_heads * D;
  const int64_t part = ((scratch_krow0(s, sp, b) + j) * s.kv_heads + kvh) * D;
  const int64_t krow = sp.k_start + j;
  T* dk = static_cast<T*>(bp.dk) + b * bp.dk_batch_stride + krow * bp.dk_row_stride + kvh * bp.dk_head_stride;
  T* dv = static_cast<T*>(bp.dv) + b * bp.dv_batch_stride + krow * bp.dv_row_stride + kvh * bp.dv_head_stride;
  for (int d = lane; d < D; d += 32) {
    float sk = 0.f, sv = 0.f;
    for (int split = 0; split < scr.num_splits; ++split) {
      sk += scr.dk_partial[split * split_stride + part + d];
      sv += scr.dv_partial[split * split_stride + part + d];
    }
    dk[d] = Tr::from_float(sk);
    dv[d] = Tr::from_float(sv);
  }
}

}  // namespace

cudaError_t launch_bwd_reduce_dkv(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream) {
  const dim3 grid(blocks_for(p.fwd.seq.seqlen_k, kConvertWarps), static_cast<unsigned>(p.fwd.seq.kv_heads),
                  static_cast<unsigned>(p.fwd.seq.batch));
  return with_dtype(dt, [&](auto elem) {
    return launch(reduce_dkv_kernel<typename decltype(elem)::type>, grid, kConvertWarps * 32, 0, stream, p, s);
  });
}

cudaError_t launch_bwd_delta(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kDeltaWarps * kDeltaRowsPerWarp;
  const dim3 grid(blocks_for(p.fwd.seq.seqlen_q, kRowsPerBlock), static_cast<unsigned>(p.fwd.seq.heads),
                  static_cast<unsigned>(p.fwd.seq.batch));
  return with_dtype(dt, [&](auto elem) {
    return launch(delta_kernel<typename decltype(elem)::type>, grid, kDeltaWarps * 32, 0, stream, p, s);
  });
}

cudaError_t launch_bwd_convert_dq(const AttnBwdParams& p, DType dt, const BwdScratch& s, cudaStream_t stream) {
  const dim3 grid(blocks_for(p.fwd.seq.seqlen_q, kConvertWarps), static_cast<unsigned>(p.fwd.seq.heads),
                  static_cast<unsigned>(p.fwd.seq.batch));
  return with_dtype(dt, [&](auto elem) {
    return launch(convert_dq_kernel<typename decltype(elem)::type>, grid, kConvertWarps * 32, 0, stream, p, s);
  });
}

}  // namespace avar::cuda
