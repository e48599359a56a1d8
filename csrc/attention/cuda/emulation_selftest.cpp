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
  __syncthreads();  // no cp_async_wait: the copies have not landed
  out[threadIdx.x] = s[4 * threadIdx.x];
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
  std::vector<float> out(64, 0.f);
  if (name == "mma") return check_mma(false);
  if (name == "mma_trans") return check_mma(true);
  if (name == "deadlock") return run(launch(deadlock_kernel, dim3(1), 64, 0, nullptr, out.data()));
  if (name == "divergent_warp") return run(launch(divergent_warp_kernel, dim3(1), 32, 0, nullptr, out.data()));
  if (name == "misaligned_ldmatrix") {
    return run(launch(misaligned_ldmatrix_kernel, dim3(1), 32, 256, nullptr, out.data()));
  }
  if (name == "too_much_smem") return run(launch(deadlock_kernel, dim3(1), 32, 200 * 1024, nullptr, out.data()));
  if (name == "early_read") {
    alignas(16) float src[128];
    for (int i = 0; i < 128; ++i) src[i] = 1.f;
    const std::string err = run(launch(early_read_kernel, dim3(1), 32, 512, nullptr, src, out.data()));
    if (!err.empty()) return err;
    for (int i = 0; i < 32; ++i) {
      if (!std::isnan(out[i])) return "a tile read before its cp.async wait gave " + std::to_string(out[i]);
    }
    return "read before the wait: NaN";
  }
  return "unknown self-test " + name;
}

}  // namespace avar::cuda
