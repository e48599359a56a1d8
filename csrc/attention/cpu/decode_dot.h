// Score micro-kernels of the CPU decode: s[r, c] = q[r] · k[c] for a few query rows against a chunk of keys read
// where they lie.
//
// A decode step does little arithmetic per byte of cache, so the instructions per key decide whether the loop keeps
// up with memory. One key at a time costs a lane reduction per (row, key) and a reload of every q vector per key;
// here each pass over D serves kDotKeys keys and kDotRows rows (each K load feeds kDotRows FMAs, each q load
// kDotKeys), and the four accumulators of one row are reduced across lanes together, by one shuffle tree.
//
// bf16 keys take _mm512_dpbf16_ps where the CPU has AVX512-BF16 (32 products per instruction, exact bf16 products
// summed in fp32, q kept in bf16 as it came); elsewhere the caller widens them to fp32 first.
#pragma once

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <ATen/cpu/vec/functional.h>

#include "common.h"

namespace avar::cpu {

// Full unrolling of the loops over register tiles, so that their accumulators are registers and not a stack array.
#define AVAR_UNROLL _Pragma("GCC unroll 16")

using DotVec = at::vec::Vectorized<float>;
constexpr int kDotKeys = 4;                             // keys per pass over D
constexpr int kDotRows = DotVec::size() >= 16 ? 4 : 2;  // rows per pass: kDotRows · kDotKeys accumulators
constexpr int64_t kBf16DotAlign = 32;                   // bf16 elements per dot-product instruction

// Software prefetch into L2 of the cache rows a later pass will read. A decode step streams the cache once, and on
// the machine measured (AMD EPYC, AVX-512) the hardware prefetcher alone left the core waiting on memory for most of
// each key: 7 GB/s of K + V per thread, where a plain read reaches 20+ GB/s. One prefetch per cache line (every other
// line halves the gain), 16 KB of rows ahead and spread over the passes rather than issued in bursts, doubles it.
// Not into L1 (measured slower): the chunk being worked on fills it.
constexpr int64_t kPrefetchBytes = 16 << 10;  // how far ahead the K stream is prefetched

// One L2 prefetch per cache line of [p, p + bytes). Always inlined: GCC marks a function that only prefetches as
// const (it writes nothing) and drops its calls.
__attribute__((always_inline)) inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  bytes += static_cast<int64_t>(reinterpret_cast<uintptr_t>(c) & 63);  // an unaligned range's last line too
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, /*rw=*/0, /*locality: L2=*/2);
}

// The rows that the pass at key c0 prefetches: rows[c0 .. c0 + kDotKeys) of n.
struct RowPrefetch {
  const char* rows = nullptr;  // null: nothing to prefetch
  int64_t stride = 0;          // bytes between rows
  int64_t n = 0;
  int64_t row_bytes = 0;
  __attribute__((always_inline)) void operator()(int64_t c0) const {
    if (rows == nullptr) return;
    const int64_t end = std::min<int64_t>(c0 + kDotKeys, n);
    for (int64_t c = c0; c < end; ++c) prefetch_l2(rows + c * stride, row_bytes);
  }
};

// The prefetches of a chunk whose first row is rows[0] (D elements per row, `stride` elements between rows), with
// `left` rows from there to the end of the range: the rows kPrefetchBytes on, none past the range.
template <typename scalar_t>
RowPrefetch rows_ahead(const scalar_t* rows, int64_t stride, int64_t left, int64_t D) {
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t ahead = std::max<int64_t>(kDotKeys, kPrefetchBytes / std::max<int64_t>(row_bytes, 1));
  RowPrefetch pf;
  if (ahead < left) {
    pf.rows = reinterpret_cast<const char*>(rows + ahead * stride);
    pf.stride = stride * static_cast<int64_t>(sizeof(scalar_t));
    pf.n = left - ahead;
    pf.row_bytes = row_bytes;
  }
  return pf;
}

// out = the sums of the lanes of a, b, c and d. By value: an accumulator whose address is taken stays in memory.
inline void lane_sums4(DotVec va, DotVec vb, DotVec vc, DotVec vd, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 a = va, b = vb, c = vc, d = vd;
  // 128-bit blocks: [a0 + a2, a1 + a3, b0 + b2, b1 + b3] and the same for c, d; then [a, b, c, d] per block.
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  x = _mm512_add_ps(x, _mm512_permute_ps(x, 0x4E));  // within each block: lanes [2, 3, 0, 1]
  x = _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1));  // [1, 0, 3, 2]: every lane holds its block's sum
  const __m512 first = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), x);
  _mm_storeu_ps(out, _mm512_castps512_ps128(first));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 ab = _mm256_hadd_ps(va, vb);  // [a01, a23, b01, b23 | a45, a67, b45, b67]
  const __m256 cd = _mm256_hadd_ps(vc, vd);
  const __m256 x = _mm256_hadd_ps(ab, cd);  // [a0-3, b0-3, c0-3, d0-3 | a4-7, b4-7, c4-7, d4-7]
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1)));
#else
  const DotVec v[4] = {va, vb, vc, vd};
  AVAR_UNROLL
  for (int j = 0; j < 4; ++j)
    out[j] = at::vec::vec_reduce_all<float>([](const DotVec& x, const DotVec& y) { return x + y; }, v[j]);
#endif
}
static_assert(kDotKeys == 4, "lane_sums4 reduces four keys at a time");

// s[r · lds + c] = q[r] · k[c] for R rows of q ([R, D] float, row stride ldq) and nk fp32 keys (row stride ldk).
// Each pass stores its kDotKeys sums at once, so a row of s holds nk rounded up to kDotKeys (past nk: the last
// key's score again).
template <int R>
void dot_rows_f32(const float* q, int64_t ldq, const float* k, int64_t ldk, int64_t nk, int64_t D, float* s,
                  int64_t lds, const RowPrefetch& pf) {
  constexpr int64_t W = DotVec::size();
  const int64_t d_full = D - D % W;
  for (int64_t c0 = 0; c0 < nk; c0 += kDotKeys) {
    pf(c0);
    const float* kp[kDotKeys];  // past nk: the last key again (its sums land in the row's padding)
    AVAR_UNROLL
    for (int j = 0; j < kDotKeys; ++j) kp[j] = k + std::min<int64_t>(c0 + j, nk - 1) * ldk;
    DotVec acc[R][kDotKeys];
    AVAR_UNROLL
    for (int r = 0; r < R; ++r) AVAR_UNROLL
    for (int j = 0; j < kDotKeys; ++j) acc[r][j] = DotVec(0.f);
    for (int64_t d = 0; d < d_full; d += W) {
      DotVec kv[kDotKeys];
      AVAR_UNROLL
      for (int j = 0; j < kDotKeys; ++j) kv[j] = DotVec::loadu(kp[j] + d);
      AVAR_UNROLL
      for (int r = 0; r < R; ++r) {
        const DotVec qv = DotVec::loadu(q + r * ldq + d);
        AVAR_UNROLL
        for (int j = 0; j < kDotKeys; ++j) acc[r][j] = at::vec::fmadd(qv, kv[j], acc[r][j]);
      }
    }
    if (d_full < D) {  // a partial vector: zeros past D on both sides
      const int64_t n = D - d_full;
      DotVec kv[kDotKeys];
      AVAR_UNROLL
      for (int j = 0; j < kDotKeys; ++j) kv[j] = DotVec::loadu(kp[j] + d_full, n);
      AVAR_UNROLL
      for (int r = 0; r < R; ++r) {
        const DotVec qv = DotVec::loadu(q + r * ldq + d_full, n);
        AVAR_UNROLL
        for (int j = 0; j < kDotKeys; ++j) acc[r][j] = at::vec::fmadd(qv, kv[j], acc[r][j]);
      }
    }
    AVAR_UNROLL
    for (int r = 0; r < R; ++r) lane_sums4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], s + r * lds + c0);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Whether this CPU runs _mm512_dpbf16_ps. Test switch: AVAR_CPU_BF16_DOT=0 makes the decode widen bf16 keys to fp32
// instead, so that path is tested on a CPU that has the instruction too.
inline bool bf16_dot_available() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  const char* env = std::getenv("AVAR_CPU_BF16_DOT");
  return has && !(env != nullptr && env[0] == '0' && env[1] == '\0');
}

// s[r · lds + c] = q[r] · k[c] for R rows of bf16 q (row stride ldq, zeros from D up to a multiple of
// kBf16DotAlign) and nk bf16 keys (row stride ldk): exact products, fp32 sums. Rows of s as for dot_rows_f32.
template <int R>
__attribute__((target("avx512bf16"))) void dot_rows_bf16(const at::BFloat16* q, int64_t ldq, const at::BFloat16* k,
                                                         int64_t ldk, int64_t nk, int64_t D, float* s, int64_t lds,
                                                         const RowPrefetch& pf) {
  const int64_t d_full = D - D % kBf16DotAlign;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (D - d_full)) - 1);
  for (int64_t c0 = 0; c0 < nk; c0 += kDotKeys) {
    pf(c0);
    const at::BFloat16* kp[kDotKeys];  // past nk: the last key again (its sums land in the row's padding)
    AVAR_UNROLL
    for (int j = 0; j < kDotKeys; ++j) kp[j] = k + std::min<int64_t>(c0 + j, nk - 1) * ldk;
    __m512 acc[R][kDotKeys];
    AVAR_UNROLL
    for (int r = 0; r < R; ++r) AVAR_UNROLL
    for (int j = 0; j < kDotKeys; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += kBf16DotAlign) {
      const __mmask32 mask = d < d_full ? ~__mmask32{0} : tail;  // the keys' zeros past D (q holds zeros there)
      __m512i kv[kDotKeys];
      AVAR_UNROLL
      for (int j = 0; j < kDotKeys; ++j) kv[j] = _mm512_maskz_loadu_epi16(mask, kp[j] + d);
      AVAR_UNROLL
      for (int r = 0; r < R; ++r) {
        const __m512i qv = _mm512_loadu_si512(q + r * ldq + d);
        AVAR_UNROLL
        for (int j = 0; j < kDotKeys; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)qv, (__m512bh)kv[j]);
      }
    }
    AVAR_UNROLL
    for (int r = 0; r < R; ++r) lane_sums4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], s + r * lds + c0);
  }
}
#else
inline bool bf16_dot_available() {
  return false;
}
#endif

// Two vectors' worth (2W elements, or n < 2W with zeros past them) of a row, as float.
inline void load_pair(const float* src, int64_t n, DotVec& lo, DotVec& hi) {
  constexpr int64_t W = DotVec::size();
  if (n >= 2 * W) {
    lo = DotVec::loadu(src);
    hi = DotVec::loadu(src + W);
  } else {
    lo = DotVec::loadu(src, std::min<int64_t>(n, W));
    hi = n > W ? DotVec::loadu(src + W, n - W) : DotVec(0.f);
  }
}
inline void load_pair(const at::BFloat16* src, int64_t n, DotVec& lo, DotVec& hi) {
  constexpr int64_t W = DotVec::size();
  using BVec = at::vec::Vectorized<at::BFloat16>;
  static_assert(BVec::size() == 2 * W, "a bf16 vector widens to two float vectors");
  const BVec b = n >= 2 * W ? BVec::loadu(src) : BVec::loadu(src, n);
  std::tie(lo, hi) = at::vec::convert_to_float<at::BFloat16>(b);
}

// Scores of every row against nk keys: fp32 keys (as given, or widened), or bf16 keys through the bf16 dot product.
// The first row tile's passes issue pf's prefetches.
template <typename key_t>
void dot_all_rows(int64_t rows, const void* q, int64_t ldq, const key_t* k, int64_t ldk, int64_t nk, int64_t D,
                  float* s, int64_t lds, const RowPrefetch& pf = RowPrefetch()) {
  TORCH_CHECK(lds % kDotKeys == 0 && lds >= nk, "avar: score rows of ", lds, " for ", nk, " keys");
  for (int64_t r0 = 0; r0 < rows; r0 += kDotRows) {
    const int64_t n = std::min<int64_t>(kDotRows, rows - r0);
    const RowPrefetch pf_tile = r0 == 0 ? pf : RowPrefetch();
    auto run = [&](auto tile) {
      constexpr int R = decltype(tile)::value;
      if constexpr (std::is_same_v<key_t, float>) {
        dot_rows_f32<R>(static_cast<const float*>(q) + r0 * ldq, ldq, k, ldk, nk, D, s + r0 * lds, lds, pf_tile);
      } else {
#if defined(CPU_CAPABILITY_AVX512)
        dot_rows_bf16<R>(static_cast<const at::BFloat16*>(q) + r0 * ldq, ldq, k, ldk, nk, D, s + r0 * lds, lds,
                         pf_tile);
#else
        TORCH_CHECK(false, "avar: the bf16 dot product needs an AVX-512 build");
#endif
      }
    };
    if (n == 1) run(std::integral_constant<int, 1>());
    if (n == 2) run(std::integral_constant<int, 2>());
    if constexpr (kDotRows >= 4) {
      if (n == 3) run(std::integral_constant<int, std::min(3, kDotRows)>());
      if (n == 4) run(std::integral_constant<int, std::min(4, kDotRows)>());
    }
  }
}

// The first n (≤ 2W) elements of lo, hi to dst: the inverse of load_pair on float rows.
inline void store_pair(const DotVec& lo, const DotVec& hi, int64_t n, float* dst) {
  constexpr int64_t W = DotVec::size();
  if (n >= 2 * W) {
    lo.store(dst);
    hi.store(dst + W);
  } else {
    lo.store(dst, std::min<int64_t>(n, W));
    if (n > W) hi.store(dst + W, n - W);
  }
}

// dst[c · D + d] = float(src[c · lds + d]): nk bf16 rows widened for the fp32 kernels.
inline void widen_rows(const at::BFloat16* src, int64_t lds, int64_t nk, int64_t D, float* dst) {
  constexpr int64_t W = DotVec::size();
  for (int64_t c = 0; c < nk; ++c) {
    for (int64_t d = 0; d < D; d += 2 * W) {
      const int64_t n = std::min<int64_t>(2 * W, D - d);
      DotVec lo, hi;
      load_pair(src + c * lds + d, n, lo, hi);
      store_pair(lo, hi, n, dst + c * D + d);
    }
  }
}

}  // namespace avar::cpu
