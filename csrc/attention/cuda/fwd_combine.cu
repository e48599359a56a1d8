// Flash-decoding's second step: each key split wrote a normalised partial (out_s, lse_s, mass_s); the full
// result is their average weighted by exp(lse_s − lse), lse = log Σ_s exp(lse_s). A split that saw no visible
// key has lse_s = −inf and weight 0; a row that no split saw stays dead (out 0, lse −inf, mass 0).
#include "common.cuh"
#include "launch.h"
#include "launch_util.cuh"

namespace avar::cuda {
namespace {

constexpr int kCombineThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const AttnFwdParams p, const FwdSplit split) {
  using Tr = ElemTraits<T>;
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqSpan sp = seq_span(p.seq, b);
  if (i >= sp.len_q) return;
  const int64_t B = p.seq.batch, H = p.seq.heads, Lmax = p.seq.seqlen_q;
  const int S = split.num_splits, D = static_cast<int>(p.seq.head_dim);
  auto prow = [&](int s) { return ((static_cast<int64_t>(s) * B + b) * H + h) * Lmax + i; };

  float mx = -INFINITY;
  // A NaN partial (a split whose scores were NaN or infinite) makes the row NaN: the max keeps it.
  for (int s = 0; s < S; ++s) mx = fmax_nan(mx, split.lse_partial[prow(s)]);
  float lse = -INFINITY;
  if (mx != -INFINITY) {
    float sum = 0.f;
    for (int s = 0; s < S; ++s) sum += expf(split.lse_partial[prow(s)] - mx);
    lse = mx + logf(sum);
  }
  const auto weight = [&](int s) { return lse == -INFINITY ? 0.f : expf(split.lse_partial[prow(s)] - lse); };

  const int64_t qrow = sp.q_start + i;
  T* o = static_cast<T*>(p.out) + b * p.o_batch_stride + qrow * p.o_row_stride + h * p.o_head_stride;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < S; ++s) {
      const float w = weight(s);
      if (w != 0.f) acc += w * split.out_partial[prow(s) * D + d];
    }
    o[d] = Tr::from_float(acc);
  }
  if (threadIdx.x == 0) p.lse[b * p.lse_batch_stride + qrow * p.lse_row_stride + h * p.lse_head_stride] = lse;
  if (p.mass != nullptr && threadIdx.x < kNumGroups) {
    float acc = 0.f;
    for (int s = 0; s < S; ++s) {
      const float w = weight(s);
      if (w != 0.f) acc += w * split.mass_partial[prow(s) * kNumGroups + threadIdx.x];
    }
    p.mass[b * p.mass_batch_stride + qrow * p.mass_row_stride + h * p.mass_head_stride + threadIdx.x] = acc;
  }
}

}  // namespace

cudaError_t launch_fwd_combine(const AttnFwdParams& p, DType dt, const FwdSplit& split, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.seq.seqlen_q), static_cast<unsigned>(p.seq.heads),
                  static_cast<unsigned>(p.seq.batch));
  return with_dtype(dt, [&](auto elem) {
    return launch(combine_kernel<typename decltype(elem)::type>, grid, kCombineThreads, 0, stream, p, split);
  });
}

}  // namespace avar::cuda
