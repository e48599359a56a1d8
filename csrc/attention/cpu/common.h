// Pieces shared by the CPU forward, backward and key-mass kernels: sequence geometry, tile loads,
// the GEMM micro-kernel and the per-column (group) logit tables.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "../params.h"

namespace avar::cpu {

// bf16 and fp32 inputs work in fp32; fp64 (gradcheck, references) works in fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// C[M, N] (+)= A[M, K] · B[K, N], row-major with leading dimensions.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

// fp64 exists for gradcheck and small references; a plain loop keeps it exact and simple.
inline void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
                 int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    if (!accumulate) std::fill(c, c + N, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[i * lda + k];
      const double* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// bf16 GEMM, C[M, N] (+)= A[M, K] · B[K, N] in fp32, with A row-major and B pair-interleaved: rows 2i and
// 2i + 1 of B are stored as one row of pairs, element (k, n) at pair_index(k, n, ldb). K must be even (pad
// with zero rows and columns). This is the layout oneDNN's bf16 dot-product instructions read, and the only
// one in which PyTorch's brgemm runs bf16 at the bf16 rate.
inline int64_t round_up_even(int64_t n) {
  return n + (n & 1);
}
inline int64_t pair_index(int64_t k, int64_t n, int64_t ldb) {
  return (k / 2) * 2 * ldb + 2 * n + (k & 1);
}

// `emulated`: the same product as a plain loop (exact bf16 products summed in fp32), for testing the bf16 GEMM
// paths on machines where oneDNN's bf16 kernels do not run (see pair_gemm_emulated).
inline void gemm_pairs(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda, const at::BFloat16* B,
                       int64_t ldb, float* C, int64_t ldc, bool accumulate, bool emulated = false) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  if (emulated) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t n = 0; n < N; ++n) {
        float acc = accumulate ? C[i * ldc + n] : 0.f;
        for (int64_t k = 0; k < K; ++k)
          acc += static_cast<float>(A[i * lda + k]) * static_cast<float>(B[pair_index(k, n, ldb)]);
        C[i * ldc + n] = acc;
      }
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/true);
}

// Test switch: with AVAR_EMULATE_BF16_GEMM=1 in the environment, bf16 inputs take the bf16 GEMM paths with the
// loop GEMM above, so that their packing and rounding are tested on any CPU (slow; for small test problems).
inline bool pair_gemm_emulated() {
  const char* v = std::getenv("AVAR_EMULATE_BF16_GEMM");
  return v != nullptr && v[0] == '1' && v[1] == '\0';
}

// Whether gemm_pairs runs here. PyTorch's brgemm takes pair-interleaved bf16 only through oneDNN's micro-kernels
// (x86 with AVX-512 and oneDNN enabled, which torch.backends.mkldnn can switch off at run time) and throws
// otherwise. A 2×2×2 product checks both that it runs and that it reads the layout as pair_index says.
inline bool bf16_pair_gemm_available() {
  static std::atomic<int> known[2] = {-1, -1};  // per oneDNN on/off: -1 not probed yet, 0 no, 1 yes
  const int on = at::globalContext().userEnabledMkldnn() ? 1 : 0;
  int v = known[on].load();
  if (v < 0) {
    const float a_val[4] = {1.f, 2.f, 3.f, 4.f};  // A [2, 2] row-major
    const float b_val[4] = {5.f, 6.f, 7.f, 8.f};  // B [2, 2] row-major
    at::BFloat16 a[4], b[4];
    for (int i = 0; i < 4; ++i) a[i] = a_val[i];
    for (int k = 0; k < 2; ++k)
      for (int n = 0; n < 2; ++n) b[pair_index(k, n, 2)] = b_val[k * 2 + n];
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    try {
      gemm_pairs(2, 2, 2, a, 2, b, 2, c, 2, /*accumulate=*/false);
      at::native::cpublas::brgemm_release(/*is_vnni=*/true);
      v = (c[0] == 19.f && c[1] == 22.f && c[2] == 43.f && c[3] == 50.f) ? 1 : 0;
    } catch (const c10::Error&) {
      v = 0;
    }
    known[on].store(v);
  }
  return v == 1;
}

inline void gemm_release() {
  at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  at::native::cpublas::brgemm_release(/*is_vnni=*/true);
}

// One sequence of the batch: where its rows start in the (possibly packed) tensors and how long it is.
struct SeqBounds {
  int64_t q_start = 0, k_start = 0;  // row offsets (varlen) or 0 (batched)
  int64_t len_q = 0, len_k = 0;
};

inline SeqBounds seq_bounds(const SeqLayout& s, int64_t b) {
  SeqBounds r;
  if (s.cu_seqlens_q != nullptr) {
    r.q_start = s.cu_seqlens_q[b];
    r.k_start = s.cu_seqlens_k[b];
    r.len_q = s.cu_seqlens_q[b + 1] - r.q_start;
    r.len_k = s.cu_seqlens_k[b + 1] - r.k_start;
  } else {
    r.len_q = s.seqlen_q;
    r.len_k = s.seqlen_k;
  }
  return r;
}

// Keys [0, visible_end(i)) are visible to query i: bottom-right aligned causal mask.
inline int64_t visible_end(const SeqLayout& s, const SeqBounds& sb, int64_t i) {
  if (!s.causal) return sb.len_k;
  return std::max<int64_t>(0, std::min<int64_t>(sb.len_k, i + sb.len_k - sb.len_q + 1));
}

template <typename T>
inline T* row_ptr(T* base, int64_t batch_stride, int64_t row_stride, int64_t head_stride, int64_t b, int64_t row,
                  int64_t h) {
  return base + b * batch_stride + row * row_stride + h * head_stride;
}

template <typename src_t, typename acc_t>
inline void load_row(const src_t* src, acc_t* dst, int64_t n, acc_t mul) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<acc_t>(src[d]) * mul;
}

template <typename dst_t, typename acc_t>
inline void store_row(const acc_t* src, dst_t* dst, int64_t n, acc_t mul) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<dst_t>(src[d] * mul);
}

// Group id of key j of sequence b (0 when no groups were given).
inline int key_group_of(const AttnFwdParams& p, int64_t b, int64_t row) {
  if (p.key_group == nullptr) return 0;
  return p.key_group[b * p.kg_batch_stride + row * p.kg_row_stride];
}

// Per sequence, the index of its first key with a group ≥ 0 (len_k when every key is masked). Query i sees a
// key iff visible_end(i) exceeds it: that, and not the value of any score, is what makes a row dead.
inline std::vector<int64_t> first_live_keys(const AttnFwdParams& p) {
  const SeqLayout& s = p.seq;
  std::vector<int64_t> first(s.batch);
  for (int64_t b = 0; b < s.batch; ++b) {
    const SeqBounds sb = seq_bounds(s, b);
    int64_t j = 0;
    while (j < sb.len_k && key_group_of(p, b, sb.k_start + j) < 0) ++j;
    first[b] = j;
  }
  return first;
}

// For one head and one key tile: s = raw · gamma_col[c] + beta_col[c]; masked keys get gamma 0, beta -inf.
template <typename acc_t>
inline void fill_group_columns(const AttnFwdParams& p, int64_t n, int64_t h, const int8_t* groups, acc_t* gamma_col,
                               acc_t* beta_col) {
  acc_t gam[kNumGroups], bet[kNumGroups];
  for (int g = 0; g < kNumGroups; ++g) {
    if constexpr (std::is_same_v<acc_t, double>) {
      gam[g] = p.logit_scale_f64[h * kNumGroups + g];
      bet[g] = p.bias_f64[h * kNumGroups + g];
    } else {
      gam[g] = p.logit_scale[h * kNumGroups + g];
      bet[g] = p.bias[h * kNumGroups + g];
    }
  }
  for (int64_t c = 0; c < n; ++c) {
    const int g = groups[c];
    if (g < 0) {
      gamma_col[c] = 0;
      beta_col[c] = neg_inf<acc_t>();
    } else {
      gamma_col[c] = gam[g];
      beta_col[c] = bet[g];
    }
  }
}

// Query-block size so that the stacked rows (heads sharing a kv head × queries) make a tall GEMM.
inline int64_t query_block_rows(int64_t rep) {
  int64_t bq = 256 / std::max<int64_t>(rep, 1);
  bq = std::max<int64_t>(8, std::min<int64_t>(128, bq));
  return bq;
}

constexpr int64_t kKeyBlock = 128;

// Runs tasks [0, n) on all threads, claimed dynamically (a causal mask makes their costs very uneven).
// `per_thread(claim)` runs once per thread, so it can own its scratch buffers; `claim()` returns the next
// task index, or -1 when none is left. `uses_gemm`: release the threads' GEMM state at the end.
template <typename Fn>
inline void parallel_tasks(int64_t n, const Fn& per_thread, bool uses_gemm = true) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto claim = [&]() -> int64_t {
      const int64_t t = next.fetch_add(1);
      return t < n ? t : -1;
    };
    per_thread(claim);
    if (uses_gemm) gemm_release();
  });
}

}  // namespace avar::cpu
