#include "cuda_dispatch.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "cuda/launch.h"
#ifdef AVAR_CUDA_EMULATION
#include "cuda/emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Type.h>
#endif

namespace avar::cuda_dispatch {
namespace {

// What the host side needs of the device: the real one, or the CPU emulation (cuda/emulation.h), where scratch
// lives in host memory and the kernels run on the calling thread.
#ifdef AVAR_CUDA_EMULATION
c10::DeviceIndex current_device() {
  return 0;
}

cudaStream_t current_stream(c10::DeviceIndex) {
  return nullptr;
}

int sm_count(c10::DeviceIndex) {
  return cuda_emulation::sm_count();
}

int64_t smem_optin_limit(c10::DeviceIndex) {
  return static_cast<int64_t>(cuda_emulation::smem_optin_limit());
}

at::TensorOptions f32_on(c10::DeviceIndex) {
  return at::TensorOptions().dtype(at::kFloat);
}

std::string kernel_name(const void* kernel) {
  return cuda_emulation::kernel_name(kernel);
}

std::string device_description(c10::DeviceIndex) {
  return cuda_emulation::device_name();
}

std::string failure_detail(cudaError_t) {
  return cuda_emulation::last_error();
}

// Scratch the kernels read and write, for the emulated device's bounds checks.
struct ScratchBuffers {
  cuda_emulation::BufferScope scope;
  void add(const char* name, const at::Tensor& t) {
    if (t.defined() && t.numel() > 0) scope.add(name, t.data_ptr(), t.nbytes());
  }
};
#else
c10::DeviceIndex current_device() {
  return c10::cuda::current_device();
}

cudaStream_t current_stream(c10::DeviceIndex device) {
  return c10::cuda::getCurrentCUDAStream(device).stream();
}

// ATen's CUDAContext.h would pull in cuBLAS/cuSPARSE headers, which a bare nvcc toolkit lacks.
int sm_count(c10::DeviceIndex device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

int64_t smem_optin_limit(c10::DeviceIndex device) {
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

at::TensorOptions f32_on(c10::DeviceIndex device) {
  return at::TensorOptions().dtype(at::kFloat).device(at::Device(at::kCUDA, device));
}

// cudaFuncGetName (CUDA 12.3) gives the kernel's mangled name; older runtimes leave it unnamed.
std::string kernel_name(const void* kernel) {
  std::string name;
#if CUDART_VERSION >= 12030
  const char* mangled = nullptr;
  if (kernel != nullptr && cudaFuncGetName(&mangled, kernel) == cudaSuccess && mangled != nullptr) {
    name = c10::demangle(mangled);
  }
#endif
  (void)kernel;
  if (name.empty()) return "a kernel";
  // As the emulation names kernels: no return type, no "(anonymous namespace)::", no parameter list.
  if (name.rfind("void ", 0) == 0) name.erase(0, 5);
  const std::string anon = "(anonymous namespace)::";
  for (size_t at = name.find(anon); at != std::string::npos; at = name.find(anon)) name.erase(at, anon.size());
  return name.substr(0, name.find('('));
}

std::string device_description(c10::DeviceIndex device) {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return "CUDA device " + std::to_string(device);
  }
  return std::string(prop.name) + " (cuda:" + std::to_string(device) + ", sm_" + std::to_string(prop.major) +
         std::to_string(prop.minor) + ")";
}

std::string failure_detail(cudaError_t err) {
  return cudaGetErrorString(err);
}

struct ScratchBuffers {
  void add(const char*, const at::Tensor&) {}
};
#endif

// A failed launch names the kernel, what it asked for, what the device allows and the device; an unsupported
// head dim (refused before any launch) says so.
void check_launch(cudaError_t err) {
  if (err == cudaSuccess) return;
  const cuda::LaunchRecord& r = cuda::last_launch();
  if (r.kernel == nullptr || r.error != err) {
    TORCH_CHECK(err != cudaErrorInvalidValue, "avar (CUDA): unsupported head dim");
    TORCH_CHECK(false, "avar (CUDA): ", failure_detail(err));
  }
  const c10::DeviceIndex device = current_device();
  TORCH_CHECK(false, "avar (CUDA): the launch of ", kernel_name(r.kernel), " failed on ", device_description(device),
              ": ", failure_detail(err), ". It asked for grid (", r.grid.x, ", ", r.grid.y, ", ", r.grid.z, "), ",
              r.threads, " threads and ", r.smem, " bytes of dynamic shared memory per CTA; the device allows ",
              smem_optin_limit(device), " bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin)");
}

using avar::cuda::DType;

DType to_dtype(at::ScalarType t) {
  TORCH_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16,
                   "avar.attention (CUDA): dtype must be float16 or bfloat16, got ", t);
  return t == at::kHalf ? DType::kHalf : DType::kBFloat16;
}

std::atomic<int> g_forced_splits{0};
std::atomic<int> g_forced_backward_splits{0};
std::atomic<int> g_tile_request{kTileAuto};
std::atomic<int64_t> g_forced_smem_limit{0};
std::atomic<int> g_gqa_packing{0};

// The shape kTileAuto takes: today's 8 warps × 16 rows until a GPU run of benchmarks/bench_gpu.py --tiles (both
// shapes, same run) shows the other faster.
constexpr cuda::FwdShape kDefaultShape = cuda::FwdShape::k8x16;

int64_t current_smem_limit() {
  const int64_t forced = g_forced_smem_limit.load();
  return forced > 0 ? forced : smem_optin_limit(current_device());
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
                    static_cast<int64_t>(addr % 16), " bytes past a 16-byte boundary and strides (batch ", batch_stride,
                    ", row ", row_stride, ", head ", head_stride, ") elements. Copy it with .contiguous() first.");
}

// Rows stepped over by a [B, L, H, D] / [T, H, D] operand: varlen packs every sequence into the row dimension.
int64_t row_extent(const SeqLayout& s, int64_t seqlen) {
  return s.cu_seqlens_q != nullptr ? std::max<int64_t>(seqlen, s.batch) : seqlen;
}

int64_t batch_extent(const SeqLayout& s) {
  return s.cu_seqlens_q != nullptr ? 1 : s.batch;
}

void check_qkv_aligned(const AttnFwdParams& p) {
  const SeqLayout& s = p.seq;
  check_aligned(p.q, "q", p.q_batch_stride, batch_extent(s), p.q_row_stride, row_extent(s, s.seqlen_q), p.q_head_stride,
                s.heads);
  check_aligned(p.k, "k", p.k_batch_stride, batch_extent(s), p.k_row_stride, row_extent(s, s.seqlen_k), p.k_head_stride,
                s.kv_heads);
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

}  // namespace

TilePlan plan_tiles(int64_t head_dim, int64_t smem_limit, int request) {
  TORCH_CHECK_VALUE(head_dim == 64 || head_dim == 80 || head_dim == 128,
                    "avar.attention (CUDA): head dim must be 64, 80 or 128, got ", head_dim);
  TORCH_CHECK_VALUE(request >= kTileAuto && request <= kTile4x32, "avar (CUDA): unknown tile request ", request);
  const int d = static_cast<int>(head_dim);
  const auto limit = static_cast<size_t>(std::max<int64_t>(smem_limit, 0));
  TilePlan plan;
  plan.fwd_shape = request == kTile8x16   ? cuda::FwdShape::k8x16
                   : request == kTile4x32 ? cuda::FwdShape::k4x32
                                          : kDefaultShape;
  // Forward: both shapes are 128-row query blocks with 64-key K/V tiles where they fit, 32-key ones otherwise (D =
  // 128 on the 99 KB of sm_86 / sm_89 / sm_120). 4 warps × 32 rows at D = 128 always take 32 keys: with 64 its
  // accumulators leave ptxas too few registers (it spills).
  const bool tall = plan.fwd_shape == cuda::FwdShape::k4x32;
  plan.fwd_block_n = d == 128 && tall ? 32 : 64;
  if (d == 128 && cuda::fwd_smem_bytes(d, cuda::kFwdBlockM, plan.fwd_block_n) > limit) plan.fwd_block_n = 32;
  TORCH_CHECK(cuda::fwd_smem_bytes(d, cuda::kFwdBlockM, plan.fwd_block_n) <= limit,
              "avar.attention (CUDA): the forward kernel for head dim ", d, " needs ",
              cuda::fwd_smem_bytes(d, cuda::kFwdBlockM, plan.fwd_block_n),
              " bytes of shared memory per block; this device allows ", smem_limit);
  plan.fwd_smem = cuda::fwd_smem_bytes(d, cuda::kFwdBlockM, plan.fwd_block_n);
  // Backward: the 8x16 request keeps 64-key blocks (4 warps); 4x32 asks for FlashAttention-2's 128-key blocks
  // (8 warps, half the dQ atomics), which fall back to 64 keys where they do not fit (D = 80 / 128 on 99 KB).
  plan.bwd_block_m = cuda::bwd_step_rows(d);
  plan.bwd_warps = plan.fwd_shape == cuda::FwdShape::k4x32 ? cuda::kBwdWarpChoices[1] : cuda::kBwdWarpChoices[0];
  if (cuda::bwd_smem_bytes(d, plan.bwd_block_m, 16 * plan.bwd_warps) > limit) plan.bwd_warps = cuda::kBwdWarpChoices[0];
  plan.bwd_smem = cuda::bwd_smem_bytes(d, plan.bwd_block_m, 16 * plan.bwd_warps);
  TORCH_CHECK(plan.bwd_smem <= limit, "avar.attention_bwd (CUDA): the backward kernel for head dim ", d, " needs ",
              plan.bwd_smem, " bytes of shared memory per block; this device allows ", smem_limit);
  return plan;
}

TilePlan plan_tiles_on_current_device(int64_t head_dim) {
  return plan_tiles(head_dim, current_smem_limit(), g_tile_request.load());
}

void set_tile_request(int request) {
  TORCH_CHECK_VALUE(request >= kTileAuto && request <= kTile4x32, "avar (CUDA): unknown tile request ", request);
  g_tile_request.store(request);
}

void set_forced_smem_limit(int64_t bytes) {
  g_forced_smem_limit.store(std::max<int64_t>(bytes, 0));
}

int gqa_pack(int64_t heads, int64_t kv_heads, int64_t seqlen_q) {
  const int mode = g_gqa_packing.load();
  if (kv_heads <= 0 || heads % kv_heads != 0) return 1;
  const int64_t rep = heads / kv_heads;
  if (rep <= 1 || rep > cuda::kMaxPack || mode == 1) return 1;
  if (mode == 2) return static_cast<int>(rep);
  // Unpacked, a chunk shorter than one query tile takes one tile per query head, each reading every K/V tile of
  // the kv head; packed, the group's rows fill ceil(Lq·rep / 128) tiles. Pack when that reads K/V fewer times
  // (decode: once instead of rep times; rep = 7: chunks of up to 109 queries).
  const int64_t m = cuda::kFwdBlockM;
  if (seqlen_q < m && (seqlen_q * rep + m - 1) / m < rep) return static_cast<int>(rep);
  return 1;
}

void set_gqa_packing(int mode) {
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "avar (CUDA): GQA packing mode must be 0, 1 or 2, got ", mode);
  g_gqa_packing.store(mode);
}

int decode_splits(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k, int pack, int block_n,
                  int sm_count) {
  // Split keys only when the query tiles leave most multiprocessors idle (decode against a cache, short chunks,
  // fewer tiles still when GQA heads are packed): then spread each tile's keys over enough CTAs to fill the GPU
  // about twice, with at least four key tiles per split so that the merge stays cheap next to the work. Up to
  // four query tiles per (sequence, head group) qualify: a packed short chunk of a large GQA group spans several.
  const int64_t m_blocks = (seqlen_q * pack + cuda::kFwdBlockM - 1) / cuda::kFwdBlockM;
  const int64_t ctas = batch * (heads / std::max(pack, 1)) * m_blocks;
  const int64_t n_tiles = (seqlen_k + block_n - 1) / block_n;
  constexpr int64_t kMinTilesPerSplit = 4, kMaxSplits = 64, kMaxQueryTiles = 4;
  if (m_blocks > kMaxQueryTiles || ctas <= 0 || 2 * ctas > sm_count || n_tiles < 2 * kMinTilesPerSplit) return 1;
  int64_t splits = std::min<int64_t>({(2 * sm_count + ctas - 1) / ctas, n_tiles / kMinTilesPerSplit, kMaxSplits});
  splits = std::min<int64_t>(splits, 65535 / std::max<int64_t>(batch, 1));
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

int decode_splits_on_current_device(int64_t batch, int64_t heads, int64_t kv_heads, int64_t seqlen_q, int64_t seqlen_k,
                                    int64_t head_dim) {
  const int forced = g_forced_splits.load();
  if (forced > 0) return static_cast<int>(std::min<int64_t>(forced, 65535 / std::max<int64_t>(batch, 1)));
  const TilePlan plan = plan_tiles_on_current_device(head_dim);
  return decode_splits(batch, heads, seqlen_q, seqlen_k, gqa_pack(heads, kv_heads, seqlen_q), plan.fwd_block_n,
                       sm_count(current_device()));
}

void set_forced_decode_splits(int n) {
  g_forced_splits.store(n);
}

int backward_splits(int64_t batch, int64_t heads, int64_t kv_heads, int64_t seqlen_q, int64_t seqlen_k, int block_n,
                    int block_m, int sm_count) {
  // The backward grid is one CTA per (key block, kv head, sequence). When that leaves multiprocessors idle (short
  // sequences, few kv heads: 34 CTAs on 132 SMs at L = 1025 with 2 kv heads and 64-key blocks), split each key
  // block's steps (query heads × query blocks) over up to two CTAs per SM, each keeping at least two steps.
  const int64_t ctas = batch * kv_heads * ((seqlen_k + block_n - 1) / block_n);
  if (ctas <= 0 || kv_heads <= 0 || ctas >= sm_count) return 1;
  const int64_t steps = heads / kv_heads * ((seqlen_q + block_m - 1) / block_m);
  constexpr int64_t kMaxSplits = 16;
  int64_t splits = std::min<int64_t>({(2 * sm_count + ctas - 1) / ctas, steps / 2, kMaxSplits});
  splits = std::min<int64_t>(splits, 65535 / kv_heads);
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

int backward_splits_on_current_device(int64_t batch, int64_t heads, int64_t kv_heads, int64_t seqlen_q,
                                      int64_t seqlen_k, int64_t head_dim) {
  const int forced = g_forced_backward_splits.load();
  if (forced > 0) return static_cast<int>(std::min<int64_t>(forced, 65535 / std::max<int64_t>(kv_heads, 1)));
  const TilePlan plan = plan_tiles_on_current_device(head_dim);
  return backward_splits(batch, heads, kv_heads, seqlen_q, seqlen_k, 16 * plan.bwd_warps, plan.bwd_block_m,
                         sm_count(current_device()));
}

void set_forced_backward_splits(int n) {
  g_forced_backward_splits.store(n);
}

namespace {

// The forward kernel of the plan's shape and K/V tile for head dim kD.
template <int kD>
cudaError_t launch_fwd_planned(const TilePlan& plan, const AttnFwdParams& p, DType dt, const cuda::FwdSplit& split,
                               int pack, cudaStream_t stream) {
  using cuda::FwdShape;
  // 4 × 32 is instantiated for causal calls only (launch_fwd); the others take 8 × 16.
  const bool tall = plan.fwd_shape == FwdShape::k4x32 && p.seq.causal;
  if constexpr (kD == 128) {
    if (tall) return cuda::launch_fwd<kD, FwdShape::k4x32, 32>(p, dt, split, pack, stream);
    if (plan.fwd_block_n == 32) return cuda::launch_fwd<kD, FwdShape::k8x16, 32>(p, dt, split, pack, stream);
    return cuda::launch_fwd<kD, FwdShape::k8x16, 64>(p, dt, split, pack, stream);
  } else {
    return tall ? cuda::launch_fwd<kD, FwdShape::k4x32, 64>(p, dt, split, pack, stream)
                : cuda::launch_fwd<kD, FwdShape::k8x16, 64>(p, dt, split, pack, stream);
  }
}

void fwd(const AttnFwdParams& p, at::ScalarType dtype) {
  const DType dt = to_dtype(dtype);
  const c10::DeviceIndex device = current_device();
  check_qkv_aligned(p);
  const SeqLayout& s = p.seq;
  const cudaStream_t stream = current_stream(device);
  const TilePlan plan = plan_tiles_on_current_device(s.head_dim);
  const int pack = gqa_pack(s.heads, s.kv_heads, s.seqlen_q);

  cuda::FwdSplit split;
  split.num_splits = decode_splits_on_current_device(s.batch, s.heads, s.kv_heads, s.seqlen_q, s.seqlen_k, s.head_dim);
  check_grid(s, split.num_splits);
  // Partials live until the kernels that read them are queued; the caching allocator orders reuse on the stream.
  at::Tensor out_partial, lse_partial, mass_partial;
  ScratchBuffers scratch_buffers;
  if (split.num_splits > 1) {
    const int64_t rows = split.num_splits * s.batch * s.heads * s.seqlen_q;
    out_partial = at::empty({rows, s.head_dim}, f32_on(device));  // [splits·B·H·Lq, D]
    lse_partial = at::empty({rows}, f32_on(device));              // [splits·B·H·Lq]
    split.out_partial = out_partial.data_ptr<float>();
    scratch_buffers.add("out_partial", out_partial);
    scratch_buffers.add("lse_partial", lse_partial);
    split.lse_partial = lse_partial.data_ptr<float>();
    if (p.mass != nullptr) {
      mass_partial = at::empty({rows, kNumGroups}, f32_on(device));  // [splits·B·H·Lq, G]
      split.mass_partial = mass_partial.data_ptr<float>();
      scratch_buffers.add("mass_partial", mass_partial);
    }
  }
  check_launch(cuda::with_head_dim(
      s.head_dim, [&](auto d) { return launch_fwd_planned<decltype(d)::value>(plan, p, dt, split, pack, stream); }));
  if (split.num_splits > 1) check_launch(cuda::launch_fwd_combine(p, dt, split, stream));
}

void bwd(const AttnBwdParams& p, at::ScalarType dtype) {
  const DType dt = to_dtype(dtype);
  const c10::DeviceIndex device = current_device();
  check_qkv_aligned(p.fwd);
  const SeqLayout& s = p.fwd.seq;
  check_aligned(p.dout, "dout", p.do_batch_stride, batch_extent(s), p.do_row_stride, row_extent(s, s.seqlen_q),
                p.do_head_stride, s.heads);
  check_grid(s, 1);
  TORCH_CHECK_VALUE(s.kv_heads <= 65535, "avar.attention_bwd (CUDA): at most 65535 kv heads, got ", s.kv_heads);
  const cudaStream_t stream = current_stream(device);
  const TilePlan plan = plan_tiles_on_current_device(s.head_dim);

  // Indexed by packed query row (b·Lq + i batched, cu_seqlens_q[b] + i varlen): scratch grows with the rows of
  // q, not with batch × the longest sequence.
  at::Tensor dq_accum = at::zeros({s.total_q, s.heads, s.head_dim}, f32_on(device));  // [Tq, H, D]
  at::Tensor delta = at::empty({s.total_q, s.heads}, f32_on(device));                 // [Tq, H]
  cuda::BwdScratch scratch;
  scratch.dq_accum = dq_accum.data_ptr<float>();
  scratch.delta = delta.data_ptr<float>();
  ScratchBuffers scratch_buffers;
  scratch_buffers.add("dq_accum", dq_accum);
  scratch_buffers.add("delta", delta);
  scratch.num_splits =
      backward_splits_on_current_device(s.batch, s.heads, s.kv_heads, s.seqlen_q, s.seqlen_k, s.head_dim);
  at::Tensor dk_partial, dv_partial;
  if (scratch.num_splits > 1) {
    // Every split writes every key row of its sequences, so no zeroing is needed.
    dk_partial = at::empty({scratch.num_splits, s.total_k, s.kv_heads, s.head_dim}, f32_on(device));  // [S, Tk, Hkv, D]
    dv_partial = at::empty({scratch.num_splits, s.total_k, s.kv_heads, s.head_dim}, f32_on(device));  // [S, Tk, Hkv, D]
    scratch.dk_partial = dk_partial.data_ptr<float>();
    scratch.dv_partial = dv_partial.data_ptr<float>();
    scratch_buffers.add("dk_partial", dk_partial);
    scratch_buffers.add("dv_partial", dv_partial);
  }
  check_launch(cuda::launch_bwd_delta(p, dt, scratch, stream));
  check_launch(cuda::with_head_dim(s.head_dim, [&](auto d) {
    constexpr int kD = decltype(d)::value;
    return plan.bwd_warps == 8 ? cuda::launch_bwd<kD, 8>(p, dt, scratch, stream)
                               : cuda::launch_bwd<kD, 4>(p, dt, scratch, stream);
  }));
  check_launch(cuda::launch_bwd_convert_dq(p, dt, scratch, stream));
  if (scratch.num_splits > 1) check_launch(cuda::launch_bwd_reduce_dkv(p, dt, scratch, stream));
}

void key_mass(const KeyMassParams& p, at::ScalarType dtype) {
  const DType dt = to_dtype(dtype);
  const c10::DeviceIndex device = current_device();
  check_qkv_aligned(p.fwd);
  check_grid(p.fwd.seq, 1);
  const cudaStream_t stream = current_stream(device);
  check_launch(cuda::with_head_dim(p.fwd.seq.head_dim,
                                   [&](auto d) { return cuda::launch_key_mass<decltype(d)::value>(p, dt, stream); }));
}

}  // namespace

const Backend kCudaBackend{&fwd, &bwd, &key_mass};

#ifdef AVAR_CUDA_EMULATION
namespace {

void emulation_fwd(const AttnFwdParams& p, at::ScalarType dtype) {
  (runs_on_emulated_device(dtype) ? kCudaBackend : kCpuBackend).fwd(p, dtype);
}

void emulation_bwd(const AttnBwdParams& p, at::ScalarType dtype) {
  (runs_on_emulated_device(dtype) ? kCudaBackend : kCpuBackend).bwd(p, dtype);
}

void emulation_key_mass(const KeyMassParams& p, at::ScalarType dtype) {
  (runs_on_emulated_device(dtype) ? kCudaBackend : kCpuBackend).key_mass(p, dtype);
}

}  // namespace

const Backend kEmulationBackend{&emulation_fwd, &emulation_bwd, &emulation_key_mass};
#endif

}  // namespace avar::cuda_dispatch
