// Vectorised row operations of the passes that recompute P from the saved LSE (backward and key mass),
// and the tile transpose that turns P and dS into the A operands of Pᵀ·dO and dSᵀ·Q.
//
// These passes use the 1-ulp exp, not the forward's 20-ulp one: dS = P∘(dP − D) and the dβ/dγ sums cancel
// (Σⱼ dSᵢⱼ = dlseᵢ), which magnifies the relative error of P several times. exp is a small fraction of the
// work here (five GEMMs per score element against two in the forward).
#pragma once

#include "row_ops.h"

namespace avar::cpu {

// dst[N, M] = src[M, N]ᵀ, both row-major with leading dimensions (16×16 register blocks on AVX-512).
template <typename acc_t>
inline void transpose_tile(const acc_t* src, int64_t ld_src, acc_t* dst, int64_t ld_dst, int64_t M, int64_t N) {
  at::vec::transpose_mxn<acc_t>(src, ld_src, dst, ld_dst, static_cast<int>(M), static_cast<int>(N));
}

// exp(raw · gamma + beta − lse), and exactly 0 for a masked key (beta = −inf) whatever raw and lse are: a row
// whose lse is NaN (a NaN or infinite score in the forward) gets NaN on the keys it sees, never on masked ones.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> prob_or_zero(const at::vec::Vectorized<acc_t>& raw,
                                               const at::vec::Vectorized<acc_t>& g,
                                               const at::vec::Vectorized<acc_t>& bt,
                                               const at::vec::Vectorized<acc_t>& lse) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec p = (at::vec::fmadd(raw, g, bt) - lse).exp();
  return Vec::blendv(p, Vec(acc_t(0)), bt == Vec(neg_inf<acc_t>()));
}

template <typename acc_t>
inline acc_t prob_or_zero(acc_t raw, acc_t g, acc_t bt, acc_t lse) {
  return bt == neg_inf<acc_t>() ? acc_t(0) : std::exp(raw * g + bt - lse);
}

// s[c] = exp(s[c] · gamma[c] + beta[c] − lse) on [0, n_vis), 0 on [n_vis, n): raw scores (scale·q·k) to P.
// A row with no visible key is passed lse = +inf, which makes every p exactly 0.
template <typename acc_t>
inline void probs_from_lse(acc_t* s, const acc_t* gamma, const acc_t* beta, acc_t lse, int64_t n_vis, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vlse(lse);
  int64_t c = 0;
  for (; c + W <= n_vis; c += W)
    prob_or_zero<acc_t>(Vec::loadu(s + c), Vec::loadu(gamma + c), Vec::loadu(beta + c), vlse).store(s + c);
  for (; c < n_vis; ++c) s[c] = prob_or_zero(s[c], gamma[c], beta[c], lse);
  for (; c < n; ++c) s[c] = 0;
}

// y[c] += a · x[c] for c in [0, n).
template <typename acc_t>
inline void axpy_row(acc_t* y, acc_t a, const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec va(a);
  int64_t c = 0;
  for (; c + W <= n; c += W) at::vec::fmadd(va, Vec::loadu(x + c), Vec::loadu(y + c)).store(y + c);
  for (; c < n; ++c) y[c] += a * x[c];
}

// One row of the backward's score tile. In: s · raw_mul = raw scores (scale·q·k), dp = dP (dO·Vᵀ + dmass[g(j)]).
// Out: s = P, dp = dS·γ with dS = P∘(dP − d). With kTables, also col_db[c] += dS and col_dg[c] += dS·raw,
// the per-key sums that dβ and dγ are reduced from.
template <bool kTables, typename acc_t>
inline void softmax_grad_row(acc_t* s, acc_t* dp, const acc_t* gamma, const acc_t* beta, acc_t lse, acc_t d,
                             acc_t raw_mul, int64_t n_vis, int64_t n, acc_t* col_db, acc_t* col_dg) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vlse(lse), vd(d), vmul(raw_mul);
  int64_t c = 0;
  for (; c + W <= n_vis; c += W) {
    const Vec raw = Vec::loadu(s + c) * vmul, g = Vec::loadu(gamma + c), bt = Vec::loadu(beta + c);
    const Vec pr = prob_or_zero<acc_t>(raw, g, bt, vlse);
    // dS = 0 on a masked key even when its V made dP non-finite (0·inf), so garbage in padding stays out of dQ.
    const Vec ds = Vec::blendv(pr * (Vec::loadu(dp + c) - vd), Vec(acc_t(0)), bt == Vec(neg_inf<acc_t>()));
    if constexpr (kTables) {
      (Vec::loadu(col_db + c) + ds).store(col_db + c);
      at::vec::fmadd(ds, raw, Vec::loadu(col_dg + c)).store(col_dg + c);
    }
    pr.store(s + c);
    (ds * g).store(dp + c);
  }
  for (; c < n_vis; ++c) {
    const acc_t raw = s[c] * raw_mul;
    const acc_t pr = prob_or_zero(raw, gamma[c], beta[c], lse);
    const acc_t ds = beta[c] == neg_inf<acc_t>() ? acc_t(0) : pr * (dp[c] - d);
    if constexpr (kTables) {
      col_db[c] += ds;
      col_dg[c] += ds * raw;
    }
    s[c] = pr;
    dp[c] = ds * gamma[c];
  }
  for (; c < n; ++c) s[c] = dp[c] = 0;
}

}  // namespace avar::cpu
