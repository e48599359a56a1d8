#include "cuda_dispatch.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>

#include "cuda/launch.h"

namespace avar::cuda_dispatch {
namespace {

using avar::cuda::DType;

DType to_dtype(at::ScalarType t) {
  TORCH_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16, "avar.attention (CUDA): dtype must be float16 or bfloat16, got ",
                   t);
  return t == at::kHalf ? DType::kHalf : DType::kBFloat16;
}

// The device a kernel argument lives on: the ops receive Params, not tensors, and the dispatcher does not set
// the current device for custom ops, so it is read off q's pointer.
c10::DeviceIndex device_of(const void* ptr) {
  cudaPointerAttributes attr{};
  C10_CUDA_CHECK(cudaPointerGetAttributes(&attr, ptr));
  TORCH_CHECK(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged,
              "avar.attention (CUDA): q does not point to device memory");
  return static_cast<c10::DeviceIndex>(attr.device);
}

// The kernels move q, k, v and dout tiles with 16-byte cp.async copies: the base pointer and every stride that
// is stepped over (batch, row, head) must be a multiple of 16 bytes, i.e. of 8 two-byte elements.
void check_aligned(const void* ptr, const char* name, int64_t batch_stride, int64_t batch, int64_t row_stride,
                   int64_t rows, int64_t head_stride, int64_t heads) {
  constexpr int64_t kElems = 8;
  const auto addr = reinterpret_cast<uintptr_t>(ptr);
  const bool ok = addr % 16 == 0 && (batch <= 1 || batch_stride % kElems == 0) &&
                  (rows <= 1 || row_stride % kElems == 0) && (heads <= 1 || head_stride % kElems == 0);
  TORCH_CHECK_VALUE(ok, "avar.attention (CUDA): ", name,
                    " must be 16-byte aligned for the kernel's vector loads: its data pointer and its batch, row "
                    "and head strides must be multiples of 8 elements; got a data pointer ",
                    static_cast<int64_t>(addr % 16), " bytes past a 16-byte boundary and strides (batch ",
                    batch_stride, ", row ", row_stride, ", head ", head_stride,
                    ") elements. Copy it with .contiguous() first.");
}

// Rows stepped over by a [B, L, H, D] / [T, H, D] operand: varlen packs every sequence into the row dimension.
int64_t row_extent(const SeqLayout& s, int64_t seqlen) {
  return s.cu_seqlens_q != nullptr ? std::max<int64_t>(seqlen, s.batch) : seqlen;
}

int64_t batch_extent(const SeqLayout& s) { return s.cu_seqlens_q != nullptr ? 1 : s.batch; }

void check_qkv_aligned(const AttnFwdParams& p) {
  const SeqLayout& s = p.seq;
  check_aligned(p.q, "q", p.q_batch_stride, batch_extent(s), p.q_row_stride, row_extent(s, s.seqlen_q),
                p.q_head_stride, s.heads);
  check_aligned(p.k, "k", p.k_batch_stride, batch_extent(s), p.k_row_stride, row_extent(s, s.seqlen_k),
                p.k_head_stride, s.kv_heads);
  if (p.v != nullptr && p.v != p.k) {
    check_aligned(p.v, "v", p.v_batch_stride, batch_extent(s), p.v_row_stride, row_extent(s, s.seqlen_k),
                  p.v_head_stride, s.kv_heads);
  }
}

void check_grid(const SeqLayout& s, int64_t z_factor) {
  constexpr int64_t kMaxGridYZ = 65535;
  TORCH_CHECK_VALUE(s.heads <= kMaxGridYZ, "avar.attention (CUDA): at most ", kMaxGridYZ, " heads, got ", s.heads);
  TORCH_CHECK_VALUE(s.batch * z_factor <= kMaxGridYZ, "avar.attention (CUDA): at most ", kMaxGridYZ / z_factor,
                    " sequences per call, got ", s.batch);
}

void check_launch(cudaError_t err) {
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

cudaError_t launch_fwd(const AttnFwdParams& p, DType dt, const cuda::FwdSplit& split, cudaStream_t stream) {
  switch (p.seq.head_dim) {
    case 64: return cuda::launch_fwd_d64(p, dt, split, stream);
    case 80: return cuda::launch_fwd_d80(p, dt, split, stream);
    case 128: return cuda::launch_fwd_d128(p, dt, split, stream);
    default: TORCH_CHECK_VALUE(false, "avar.attention (CUDA): head dim ", p.seq.head_dim, " is not supported (64, 80 or 128)");
  }
}

cudaError_t launch_bwd(const AttnBwdParams& p, DType dt, const cuda::BwdScratch& s, cudaStream_t stream) {
  switch (p.fwd.seq.head_dim) {
    case 64: return cuda::launch_bwd_d64(p, dt, s, stream);
    case 80: return cuda::launch_bwd_d80(p, dt, s, stream);
    case 128: return cuda::launch_bwd_d128(p, dt, s, stream);
    default:
      TORCH_CHECK_VALUE(false, "avar.attention_bwd (CUDA): head dim ", p.fwd.seq.head_dim,
                        " is not supported (64, 80 or 128)");
  }
}

cudaError_t launch_key_mass(const KeyMassParams& p, DType dt, cudaStream_t stream) {
  switch (p.fwd.seq.head_dim) {
    case 64: return cuda::launch_key_mass_d64(p, dt, stream);
    case 80: return cuda::launch_key_mass_d80(p, dt, stream);
    case 128: return cuda::launch_key_mass_d128(p, dt, stream);
    default:
      TORCH_CHECK_VALUE(false, "avar.attention_key_mass (CUDA): head dim ", p.fwd.seq.head_dim,
                        " is not supported (64, 80 or 128)");
  }
}

// ATen's CUDAContext.h would pull in cuBLAS/cuSPARSE headers, which a bare nvcc toolkit lacks.
int sm_count(c10::DeviceIndex device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

at::TensorOptions f32_on(c10::DeviceIndex device) {
  return at::TensorOptions().dtype(at::kFloat).device(at::Device(at::kCUDA, device));
}

}  // namespace

int decode_splits(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k, int sm_count) {
  // Split keys only when one query block per head leaves most multiprocessors idle (decode against a cache,
  // short chunks): then spread each head's keys over enough CTAs to fill the GPU about twice, with at least
  // four key tiles per split so that the merge stays cheap next to the work.
  const int64_t m_blocks = (seqlen_q + cuda::kFwdBlockM - 1) / cuda::kFwdBlockM;
  const int64_t ctas = batch * heads * m_blocks;
  const int64_t n_tiles = (seqlen_k + cuda::kFwdBlockN - 1) / cuda::kFwdBlockN;
  constexpr int64_t kMinTilesPerSplit = 4, kMaxSplits = 64;
  if (m_blocks != 1 || ctas <= 0 || 2 * ctas > sm_count || n_tiles < 2 * kMinTilesPerSplit) return 1;
  int64_t splits = std::min<int64_t>({(2 * sm_count + ctas - 1) / ctas, n_tiles / kMinTilesPerSplit, kMaxSplits});
  splits = std::min<int64_t>(splits, 65535 / std::max<int64_t>(batch, 1));
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

int decode_splits_on_current_device(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k) {
  return decode_splits(batch, heads, seqlen_q, seqlen_k, sm_count(c10::cuda::current_device()));
}

void attention_fwd(const AttnFwdParams& p, at::ScalarType dtype) {
  const DType dt = to_dtype(dtype);
  const c10::DeviceIndex device = device_of(p.q);
  const c10::cuda::CUDAGuard guard(device);
  check_qkv_aligned(p);
  const SeqLayout& s = p.seq;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  cuda::FwdSplit split;
  split.num_splits =
      decode_splits(s.batch, s.heads, s.seqlen_q, s.seqlen_k, sm_count(device));
  check_grid(s, split.num_splits);
  // Partials live until the kernels that read them are queued; the caching allocator orders reuse on the stream.
  at::Tensor out_partial, lse_partial, mass_partial;
  if (split.num_splits > 1) {
    const int64_t rows = split.num_splits * s.batch * s.heads * s.seqlen_q;
    out_partial = at::empty({rows, s.head_dim}, f32_on(device));  // [splits·B·H·Lq, D]
    lse_partial = at::empty({rows}, f32_on(device));              // [splits·B·H·Lq]
    split.out_partial = out_partial.data_ptr<float>();
    split.lse_partial = lse_partial.data_ptr<float>();
    if (p.mass != nullptr) {
      mass_partial = at::empty({rows, kNumGroups}, f32_on(device));  // [splits·B·H·Lq, G]
      split.mass_partial = mass_partial.data_ptr<float>();
    }
  }
  check_launch(launch_fwd(p, dt, split, stream));
  if (split.num_splits > 1) check_launch(cuda::launch_fwd_combine(p, dt, split, stream));
}

void attention_bwd(const AttnBwdParams& p, at::ScalarType dtype) {
  const DType dt = to_dtype(dtype);
  const c10::DeviceIndex device = device_of(p.fwd.q);
  const c10::cuda::CUDAGuard guard(device);
  check_qkv_aligned(p.fwd);
  const SeqLayout& s = p.fwd.seq;
  check_aligned(p.dout, "dout", p.do_batch_stride, batch_extent(s), p.do_row_stride, row_extent(s, s.seqlen_q),
                p.do_head_stride, s.heads);
  check_grid(s, 1);
  TORCH_CHECK_VALUE(s.kv_heads <= 65535, "avar.attention_bwd (CUDA): at most 65535 kv heads, got ", s.kv_heads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  at::Tensor dq_accum = at::zeros({s.batch, s.heads, s.seqlen_q, s.head_dim}, f32_on(device));  // [B, H, Lq, D]
  at::Tensor delta = at::empty({s.batch, s.heads, s.seqlen_q}, f32_on(device));                 // [B, H, Lq]
  cuda::BwdScratch scratch;
  scratch.dq_accum = dq_accum.data_ptr<float>();
  scratch.delta = delta.data_ptr<float>();
  check_launch(cuda::launch_bwd_delta(p, dt, scratch, stream));
  check_launch(launch_bwd(p, dt, scratch, stream));
  check_launch(cuda::launch_bwd_convert_dq(p, dt, scratch, stream));
}

void attention_key_mass(const KeyMassParams& p, at::ScalarType dtype) {
  const DType dt = to_dtype(dtype);
  const c10::DeviceIndex device = device_of(p.fwd.q);
  const c10::cuda::CUDAGuard guard(device);
  check_qkv_aligned(p.fwd);
  check_grid(p.fwd.seq, 1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  check_launch(launch_key_mass(p, dt, stream));
}

}  // namespace avar::cuda_dispatch
