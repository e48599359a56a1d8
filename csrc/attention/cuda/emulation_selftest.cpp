// Self-tests of the emulated device (emulation.h), built into avar_ops._C_emu only: small kernels written with the
// same building blocks as the attention kernels (common.cuh), one per property the emulation claims. Each returns
// the launch's error message ("" when it ran), or a description of a wrong result.
#include "emulation_selftest.h"

#include <cmath>
#include <string>
#include <vector>

#include "common.cuh"
#include "launch_util.cuh"

namespace avar::cuda {
namespace {

constexpr int kStride = 16 + kPad;  // a 16×16 tile padded as the kernels pad theirs

// D = A·B (16×16 · 16×8, bf16, fp32 out) through ldmatrix + mma.sync with the kernels' address patterns; A and B
// come from row-major global arrays, B stored as [n][k] (the Kᵀ operand of the attention kernels).
__global__ void mma_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b_nk, float* d) {
  __nv_bfloat16* sA = reinterpret_cast<__nv_bfloat16*>(dynamic_smem());
  __nv_bfloat16* sB = sA + 16 * kStride;
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * 16; i += 32) {
    sA[(i / 16) * kStride + i % 16] = a[i];
    sB[(i / 16) * kStride + i % 16] = b_nk[i];  // rows 8..15 are the second n8 block
  }
  __syncthreads();
  uint32_t fa[4], fb[4];
  ldmatrix_x4(fa, lds_pattern_a<kStride>(sA, 0, 0, lane));
  ldmatrix_x4(fb, lds_pattern_b<kStride>(sB, 0, 0, lane));
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  mma_16816<__nv_bfloat16>(acc[0], fa, fb[0], fb[1]);
  mma_16816<__nv_bfloat16>(acc[1], fa, fb[2], fb[3]);
  const int gid = lane >> 2, tig = lane & 3;
  for (int nb = 0; nb < 2; ++nb) {
    for (int e = 0; e < 4; ++e) d[(gid + 8 * (e >> 1)) * 16 + nb * 8 + 2 * tig + (e & 1)] = acc[nb][e];
  }
}

// The same product with A loaded transposed: A is stored as [k][m] and read with ldmatrix.trans.
__global__ void mma_trans_kernel(const __nv_bfloat16* a_km, const __nv_bfloat16* b_nk, float* d) {
  __nv_bfloat16* sA = reinterpret_cast<__nv_bfloat16*>(dynamic_smem());
  __nv_bfloat16* sB = sA + 16 * kStride;
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * 16; i += 32) {
    sA[(i / 16) * kStride + i % 16] = a_km[i];
    sB[(i / 16) * kStride + i % 16] = b_nk[i];
  }
  __syncthreads();
  uint32_t fa[4], fb[4];
  ldmatrix_x4_trans(fa, lds_pattern_b<kStride>(sA, 0, 0, lane));
  ldmatrix_x4(fb, lds_pattern_b<kStride>(sB, 0, 0, lane));
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  mma_16816<__nv_bfloat16>(acc, fa, fb[0], fb[1]);
  const int gid = lane >> 2, tig = lane & 3;
  for (int e = 0; e < 4; ++e) d[(gid + 8 * (e >> 1)) * 8 + 2 * tig + (e & 1)] = acc[e];
}

__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x < 32) __syncthreads();  // the second warp never arrives
  out[threadIdx.x] = 1.f;
}

__global__ void divergent_warp_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const uint32_t a[4] = {0u, 0u, 0u, 0u};
    mma_16816<__nv_bfloat16>(acc, a, 0u, 0u);  // another warp instruction at the same point
    v = acc[0];
  }
  out[threadIdx.x] = v;
}

__global__ void misaligned_ldmatrix_kernel(float* out) {
  unsigned char* smem = dynamic_smem();
  uint32_t r[4];
  ldmatrix_x4(r, smem_addr(smem + 2 + 16 * (threadIdx.x % 8)));
  out[threadIdx.x] = static_cast<float>(r[0]);
}

__global__ void early_read_kernel(const float* src, float* out) {
  float* s = reinterpret_cast<float*>(dynamic_smem());
  cp_async_16(s + 4 * threadIdx.x, src + 4 * threadIdx.x, true);
  cp_async_commit();
  __syncthreads();  // no cp_async_wait: the copies may not have landed
  out[threadIdx.x] = s[4 * threadIdx.x];
}

// Every thread zeroes its slot and the CTA synchronises, so that what follows is the only unsynchronised pair.
__device__ float* zeroed_slots() {
  float* s = reinterpret_cast<float*>(dynamic_smem());
  s[threadIdx.x] = 0.f;
  __syncthreads();
  return s;
}

// Warp 0 writes, warp 1 reads the same floats, with no __syncthreads between them.
__global__ void missing_barrier_kernel(float* out) {
  float* s = zeroed_slots();
  const int lane = threadIdx.x % 32;
  if (threadIdx.x < 32) {
    s[lane] = 1.f;
  } else {
    out[lane] = s[lane];
  }
}

// A double buffer without the barrier that ends each step: warp 1 still reads tile 0 from the buffer while warp 0
// already issues the cp.async of the next tile into it.
__global__ void overwrite_in_flight_kernel(const float* src, float* out) {
  float* s = reinterpret_cast<float*>(dynamic_smem());
  const int tid = threadIdx.x, lane = tid % 32;
  if (tid < 32) cp_async_16(s + 4 * lane, src + 4 * lane, true);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  if (tid < 32) {
    cp_async_16(s + 4 * lane, src + 128 + 4 * lane, true);  // the next tile, same buffer
    cp_async_commit();
  } else {
    out[lane] = s[4 * lane];
  }
  cp_async_wait<0>();
}

// Warp 0 waits for its copies but no __syncthreads publishes them before warp 1 reads them (the buffer was
// zeroed and published first, so that warp 1 reads written memory whichever warp runs first).
__global__ void unpublished_copy_kernel(const float* src, float* out) {
  float* s = reinterpret_cast<float*>(dynamic_smem());
  const int tid = threadIdx.x, lane = tid % 32;
  s[tid] = 0.f;
  s[tid + 64] = 0.f;
  __syncthreads();
  if (tid < 32) cp_async_16(s + 4 * lane, src + 4 * lane, true);
  cp_async_commit();
  cp_async_wait<0>();
  if (tid >= 32) out[lane] = s[4 * lane];
}

// Atomics of several warps on one shared float are not a race; a plain read beside them in the interval is.
__global__ void shared_atomics_kernel(float* out, int plain_read) {
  float* s = zeroed_slots();
  atomicAdd(&s[0], 1.f);
  if (plain_read != 0 && threadIdx.x == 40) out[0] = s[0];
  __syncthreads();
  out[threadIdx.x] = s[0];
}

__global__ void uninitialised_read_kernel(float* out) {
  const float* s = reinterpret_cast<const float*>(dynamic_smem());
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void global_read_kernel(const float* src, float* out, int n) {
  out[threadIdx.x] = src[threadIdx.x + n];  // n = 1: the last thread reads one past the end
}

__global__ void global_write_kernel(float* out, int n) {
  out[threadIdx.x + n] = 1.f;
}

__global__ void cp_async_source_kernel(const float* src, float* out) {
  float* s = reinterpret_cast<float*>(dynamic_smem());
  cp_async_16(s + 4 * threadIdx.x, src + 4 * threadIdx.x + 4, true);  // the last chunk starts at the end
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  out[threadIdx.x] = s[4 * threadIdx.x];
}

// Records the order in which the warps pass a point after some shared-memory traffic: it changes with the seed.
__global__ void arrival_order_kernel(int* order, int* count) {
  float* s = zeroed_slots();
  for (int i = 0; i < 4; ++i) s[threadIdx.x] += 1.f;
  if (threadIdx.x % 32 == 0) order[(*count)++] = static_cast<int>(threadIdx.x / 32);
}

// What thread 0 sees in its cp.async destination at three points before the wait that covers the copy, then
// after it (with the checks off, which would otherwise refuse the early reads).
__global__ void landing_kernel(const float* src, float* seen) {
  float* s = reinterpret_cast<float*>(dynamic_smem());
  if (threadIdx.x == 0) cp_async_16(s, src, true);
  cp_async_commit();
  for (int i = 0; i < 3; ++i) {
    if (threadIdx.x == 0) seen[i] = s[0];
    __shfl_xor_sync(0xffffffffu, 0.f, 1);  // a warp instruction: a point where a copy may land
  }
  cp_async_wait<0>();
  if (threadIdx.x == 0) seen[3] = s[0];
}

__global__ void empty_kernel(float* out) {
  out[threadIdx.x] = 0.f;
}

std::string run(cudaError_t err) {
  return err == cudaSuccess ? "" : cuda_emulation::last_error();
}

float bf16_value(int i) {
  return static_cast<float>((i * 7) % 13 - 6) * 0.5f;  // small exact values: every product and sum is exact
}

std::string check_mma(bool trans) {
  std::vector<__nv_bfloat16> a(256), b(256);
  std::vector<float> av(256), bv(256), d(trans ? 128 : 256, NAN);
  for (int i = 0; i < 256; ++i) {
    av[i] = bf16_value(i);
    bv[i] = bf16_value(3 * i + 1);
    a[i] = __float2bfloat16_rn(av[i]);
    b[i] = __float2bfloat16_rn(bv[i]);
  }
  cuda_emulation::BufferScope buffers;
  buffers.add("a", a.data(), a.size() * sizeof(a[0]));
  buffers.add("b", b.data(), b.size() * sizeof(b[0]));
  buffers.add("d", d.data(), d.size() * sizeof(d[0]));
  const size_t smem = 2 * 16 * kStride * sizeof(__nv_bfloat16);
  const cudaError_t err = trans ? launch(mma_trans_kernel, dim3(1), 32, smem, nullptr, a.data(), b.data(), d.data())
                                : launch(mma_kernel, dim3(1), 32, smem, nullptr, a.data(), b.data(), d.data());
  if (err != cudaSuccess) return run(err);
  const int n_cols = trans ? 8 : 16;
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < n_cols; ++n) {
      float want = 0.f;
      for (int k = 0; k < 16; ++k) want += (trans ? av[k * 16 + m] : av[m * 16 + k]) * bv[n * 16 + k];
      if (d[m * n_cols + n] != want) {
        return "D[" + std::to_string(m) + "][" + std::to_string(n) + "] = " + std::to_string(d[m * n_cols + n]) +
               ", expected " + std::to_string(want);
      }
    }
  }
  return "";
}

}  // namespace

std::string emulation_selftest(const std::string& name) {
  if (name == "mma") return check_mma(false);
  if (name == "mma_trans") return check_mma(true);
  std::vector<float> out(1024, 0.f);
  // On the heap: the launching thread's stack holds the kernels' arguments, and the bounds checks let it be.
  std::vector<float> src_buffer(256, 1.f);
  float* src = src_buffer.data();
  // Global accesses are checked against these buffers.
  cuda_emulation::BufferScope buffers;
  buffers.add("out", out.data(), out.size() * sizeof(float));
  buffers.add("src", src, 128 * sizeof(float));  // the kernels may read the first 128 floats only
  if (name == "deadlock") return run(launch(deadlock_kernel, dim3(1), 64, 0, nullptr, out.data()));
  if (name == "divergent_warp") return run(launch(divergent_warp_kernel, dim3(1), 32, 0, nullptr, out.data()));
  if (name == "misaligned_ldmatrix") {
    return run(launch(misaligned_ldmatrix_kernel, dim3(1), 32, 256, nullptr, out.data()));
  }
  if (name.rfind("smem:", 0) == 0) {
    const size_t bytes = std::stoull(name.substr(5));
    return run(launch(empty_kernel, dim3(1), 32, bytes, nullptr, out.data()));
  }
  if (name == "threads_2048") return run(launch(empty_kernel, dim3(1), 2048, 0, nullptr, out.data()));
  if (name == "grid_y_65536") return run(launch(empty_kernel, dim3(1, 65536), 32, 0, nullptr, out.data()));
  if (name == "registers_255x512") {
    cuda_emulation::LaunchConfig config;
    config.kernel = reinterpret_cast<const void*>(&empty_kernel);
    config.grid = dim3(1);
    config.threads = 512;
    config.registers_per_thread = 255;
    float* o = out.data();
    return run(cuda_emulation::launch(config, [](void* p) { empty_kernel(static_cast<float*>(p)); }, o));
  }
  if (name == "early_read") return run(launch(early_read_kernel, dim3(1), 32, 512, nullptr, src, out.data()));
  if (name == "missing_barrier") return run(launch(missing_barrier_kernel, dim3(1), 64, 256, nullptr, out.data()));
  if (name == "overwrite_in_flight") {
    buffers.add("src tile 1", src + 128, 128 * sizeof(float));
    return run(launch(overwrite_in_flight_kernel, dim3(1), 64, 512, nullptr, src, out.data()));
  }
  if (name == "unpublished_copy") {
    return run(launch(unpublished_copy_kernel, dim3(1), 64, 512, nullptr, src, out.data()));
  }
  if (name == "shared_atomics" || name == "shared_atomics_and_read") {
    const std::string err =
        run(launch(shared_atomics_kernel, dim3(1), 64, 256, nullptr, out.data(), name == "shared_atomics" ? 0 : 1));
    if (!err.empty()) return err;
    return out[0] == 64.f ? "" : "64 atomic adds gave " + std::to_string(out[0]);
  }
  if (name == "uninitialised_read")
    return run(launch(uninitialised_read_kernel, dim3(1), 32, 128, nullptr, out.data()));
  if (name == "global_read_past_end") {
    return run(launch(global_read_kernel, dim3(1), 128, 0, nullptr, static_cast<const float*>(src), out.data(), 1));
  }
  if (name == "global_read_in_bounds") {
    return run(launch(global_read_kernel, dim3(1), 128, 0, nullptr, static_cast<const float*>(src), out.data(), 0));
  }
  if (name == "global_write_past_end") {
    return run(launch(global_write_kernel, dim3(1), 32, 0, nullptr, out.data(), 1024 - 31));
  }
  if (name == "cp_async_source_past_end") {
    return run(launch(cp_async_source_kernel, dim3(1), 32, 512, nullptr, static_cast<const float*>(src), out.data()));
  }
  if (name == "arrival_order") {
    std::vector<int> order(8, -1), count(1, 0);
    buffers.add("order", order.data(), order.size() * sizeof(int));
    buffers.add("count", count.data(), sizeof(int));
    const std::string err = run(launch(arrival_order_kernel, dim3(1), 256, 1024, nullptr, order.data(), count.data()));
    if (!err.empty()) return err;
    std::string r;
    for (int w : order) r += (r.empty() ? "" : ",") + std::to_string(w);
    return r;
  }
  if (name == "landing") {
    src[0] = 2.f;
    const std::string err =
        run(launch(landing_kernel, dim3(1), 32, 64, nullptr, static_cast<const float*>(src), out.data()));
    if (!err.empty()) return err;
    std::string r;
    for (int i = 0; i < 4; ++i) r += (i ? "," : "") + std::string(std::isnan(out[i]) ? "nan" : std::to_string(out[i]));
    return r;
  }
  return "unknown self-test " + name;
}

}  // namespace avar::cuda
