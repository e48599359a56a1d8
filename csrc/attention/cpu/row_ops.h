// Vectorised row operations on one score-tile row: group bias + max, and exp against the running max.
#pragma once

#include <type_traits>

#include "common.h"

namespace avar::cpu {

// max that keeps a NaN from either side (std::max(m, NaN) is m, which would hide a NaN score as a dead row).
template <typename acc_t>
inline acc_t max_nan(acc_t a, acc_t b) {
  return (std::isnan(a) || a > b) ? a : b;
}

// s[c] = s[c] · gamma[c] + beta[c] on the visible prefix [0, n_vis), −inf on [n_vis, n); returns the row max,
// NaN if any visible score is NaN. Masked keys come with gamma 0, beta −inf and a zero K row, so their raw
// score is 0 and their s −inf whatever the key's stored values.
template <typename acc_t>
inline acc_t bias_and_max(acc_t* s, const acc_t* gamma, const acc_t* beta, int64_t n_vis, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  acc_t m = neg_inf<acc_t>();
  int64_t c = 0;
  if (n_vis >= W) {
    Vec vmax(neg_inf<acc_t>());
    for (; c + W <= n_vis; c += W) {
      const Vec x = at::vec::fmadd(Vec::loadu(s + c), Vec::loadu(gamma + c), Vec::loadu(beta + c));
      x.store(s + c);
      vmax = at::vec::maximum(vmax, x);  // propagates NaN
    }
    alignas(64) acc_t lanes[W];
    vmax.store(lanes);
    for (int64_t w = 0; w < W; ++w) m = max_nan(m, lanes[w]);
  }
  for (; c < n_vis; ++c) {
    s[c] = s[c] * gamma[c] + beta[c];
    m = max_nan(m, s[c]);
  }
  for (; c < n; ++c) s[c] = neg_inf<acc_t>();
  return m;
}

template <typename acc_t>
inline at::vec::Vectorized<acc_t> fast_exp(const at::vec::Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// s[c] = exp(s[c] − m) for c in [0, n).
template <typename acc_t>
inline void exp_shifted(acc_t* s, acc_t m, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vm(m);
  int64_t c = 0;
  for (; c + W <= n; c += W) fast_exp<acc_t>(Vec::loadu(s + c) - vm).store(s + c);
  for (; c < n; ++c) s[c] = std::exp(s[c] - m);
}

// s[c] = exp(s[c] − m) for c in [0, n); returns Σ_c s[c] (summed before any later rounding of s).
template <typename acc_t>
inline acc_t exp_shifted_sum(acc_t* s, acc_t m, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vm(m);
  Vec vsum(acc_t(0));
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const Vec e = fast_exp<acc_t>(Vec::loadu(s + c) - vm);
    e.store(s + c);
    vsum = vsum + e;
  }
  alignas(64) acc_t lanes[W];
  vsum.store(lanes);
  acc_t sum = 0;
  for (int64_t w = 0; w < W; ++w) sum += lanes[w];
  for (; c < n; ++c) {
    s[c] = std::exp(s[c] - m);
    sum += s[c];
  }
  return sum;
}

// x[c] *= mul for c in [0, n) (rescaling an accumulator row when the running max moves).
template <typename acc_t>
inline void scale_row(acc_t* x, acc_t mul, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vm(mul);
  int64_t c = 0;
  for (; c + W <= n; c += W) (Vec::loadu(x + c) * vm).store(x + c);
  for (; c < n; ++c) x[c] *= mul;
}

}  // namespace avar::cpu
