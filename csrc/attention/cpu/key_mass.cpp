// CPU key mass: key_mass[b, h, j] = Σ_i w[b, h, i] · P_ij, P recomputed from the saved LSE (the dV pass of
// the backward with a scalar dO per query).
//
// One task = (sequence b, kv head, chunk of keys), so every output element belongs to exactly one task. The
// chunk's Kᵀ is converted once; the task walks the query blocks that can see the chunk (rep heads stacked
// as rows) and adds w_i · P[i, :] into per-head accumulators.
//
// Against a cache (a sequence of at most kDecodeMaxQueries queries) the few rows would not pay for the transposed
// copy and a GEMM per key block: the scores come from the decode's dot products over the K rows where they lie
// (decode_dot.h). A masked key's score is computed from whatever its K holds and then dropped: its β = −inf makes
// probs_from_lse write P = 0 without reading the score.
#include "cpu_kernels.h"
#include "decode_dot.h"
#include "grad_row_ops.h"

namespace avar::cpu {
namespace {

constexpr int64_t kKeyChunk = 2 * kKeyBlock;

struct KeyChunk {
  int64_t b, j0, cost;
};

// First query of the sequence that sees key j (causal, bottom-right aligned).
int64_t first_query_seeing(const SeqLayout& s, const SeqBounds& sb, int64_t j) {
  if (!s.causal) return 0;
  return std::max<int64_t>(0, j - (sb.len_k - sb.len_q));
}

template <typename scalar_t>
void key_mass_impl(const KeyMassParams& kp) {
  using acc_t = typename AccType<scalar_t>::type;
  const AttnFwdParams& p = kp.fwd;
  const SeqLayout& s = p.seq;
  const int64_t rep = s.heads / s.kv_heads;
  const int64_t D = s.head_dim, Bq = query_block_rows(rep), Bk = kKeyBlock, Kc = kKeyChunk;
  const int64_t max_rows = rep * Bq;
  const acc_t scale = static_cast<acc_t>(s.scale);
  constexpr bool kDirect = std::is_same_v<acc_t, float>;  // fp32 work: the decode's dot products apply

  std::vector<KeyChunk> chunks;
  for (int64_t b = 0; b < s.batch; ++b) {
    const SeqBounds sb = seq_bounds(s, b);
    for (int64_t j0 = 0; j0 < sb.len_k; j0 += Kc)
      chunks.push_back({b, j0, (sb.len_q - first_query_seeing(s, sb, j0)) * std::min(Kc, sb.len_k - j0)});
  }
  std::stable_sort(chunks.begin(), chunks.end(), [](const KeyChunk& a, const KeyChunk& c) { return a.cost > c.cost; });
  const int64_t n_tasks = static_cast<int64_t>(chunks.size()) * s.kv_heads;

  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);

  parallel_tasks(n_tasks, [&](const auto& claim) {
    std::vector<acc_t> kt(Kc * D);                    // [Kc / Bk, D, Bk]  Kᵀ of the chunk, per key block
    std::vector<acc_t> gam(rep * Kc), bet(rep * Kc);  // [rep, Kc]
    std::vector<acc_t> km(rep * Kc);                  // [rep, Kc]  accumulated key mass
    std::vector<int8_t> grp(Kc);
    std::vector<acc_t> qs(max_rows * D);                                              // [rows, D]  q · scale
    std::vector<acc_t> lse_r(max_rows), w_r(max_rows);                                // [rows]
    std::vector<acc_t> sbuf(max_rows * Bk);                                           // [rows, Bk]  scores, then P
    std::vector<float> kw(kDirect && !std::is_same_v<scalar_t, float> ? Bk * D : 0);  // [Bk, D]  bf16 keys widened

    for (int64_t t = claim(); t >= 0; t = claim()) {
      const KeyChunk& ch = chunks[t / s.kv_heads];
      const int64_t kvh = t % s.kv_heads, b = ch.b;
      const SeqBounds sb = seq_bounds(s, b);
      const int64_t nc = std::min(Kc, sb.len_k - ch.j0);
      const bool direct = kDirect && sb.len_q <= kDecodeMaxQueries;

      for (int64_t c = 0; c < nc; ++c) {
        const int64_t row = sb.k_start + ch.j0 + c;
        grp[c] = static_cast<int8_t>(key_group_of(p, b, row));
        if (direct) continue;
        const scalar_t* kr = row_ptr(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, row, kvh);
        acc_t* ktc = kt.data() + (c / Bk) * D * Bk + c % Bk;
        // A masked key's K is taken as 0 (it has P = 0 whatever it holds).
        for (int64_t d = 0; d < D; ++d) ktc[d * Bk] = grp[c] >= 0 ? static_cast<acc_t>(kr[d]) : acc_t(0);
      }
      for (int64_t hh = 0; hh < rep; ++hh)
        fill_group_columns(p, nc, kvh * rep + hh, grp.data(), gam.data() + hh * Kc, bet.data() + hh * Kc);
      std::fill(km.begin(), km.end(), acc_t(0));

      for (int64_t q0 = first_query_seeing(s, sb, ch.j0); q0 < sb.len_q; q0 += Bq) {
        const int64_t nq = std::min(Bq, sb.len_q - q0);
        const int64_t rows = rep * nq;  // row r = hh * nq + qi
        for (int64_t hh = 0; hh < rep; ++hh) {
          const int64_t h = kvh * rep + hh;
          for (int64_t qi = 0; qi < nq; ++qi) {
            const int64_t r = hh * nq + qi, row = sb.q_start + q0 + qi;
            load_row(row_ptr(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, row, h), qs.data() + r * D, D,
                     scale);
            const float l = p.lse[b * p.lse_batch_stride + row * p.lse_row_stride + h * p.lse_head_stride];
            // A row that sees no key has lse = −inf; +inf makes its recomputed P zero.
            lse_r[r] = l == -std::numeric_limits<float>::infinity() ? std::numeric_limits<acc_t>::infinity()
                                                                    : static_cast<acc_t>(l);
            w_r[r] = kp.query_weight[b * kp.w_batch_stride + row * kp.w_row_stride + h * kp.w_head_stride];
          }
        }
        const int64_t kv_end = std::min(nc, visible_end(s, sb, q0 + nq - 1) - ch.j0);
        const int64_t first_row_end = visible_end(s, sb, q0) - ch.j0;
        for (int64_t c0 = 0; c0 < kv_end; c0 += Bk) {
          const int64_t nk = std::min(Bk, kv_end - c0);
          if (direct) {
            if constexpr (kDirect) {
              const scalar_t* kr =
                  row_ptr(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, sb.k_start + ch.j0 + c0, kvh);
              // K read where it lies, as the decode reads it: prefetched into L2 ahead, within the chunk.
              const RowPrefetch pf = rows_ahead(kr, p.k_row_stride, kv_end - c0, D);
              if constexpr (std::is_same_v<scalar_t, float>) {
                dot_all_rows(rows, qs.data(), D, kr, p.k_row_stride, nk, D, sbuf.data(), Bk, pf);
              } else {
                widen_rows(kr, p.k_row_stride, nk, D, kw.data());
                dot_all_rows(rows, qs.data(), D, kw.data(), D, nk, D, sbuf.data(), Bk, pf);
              }
            }
          } else {
            gemm(rows, nk, D, qs.data(), D, kt.data() + c0 * D, Bk, sbuf.data(), Bk, /*accumulate=*/false);
          }
          const bool all_visible = c0 + nk <= first_row_end;
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t hh = r / nq, qi = r % nq;
            const int64_t n_vis =
                all_visible ? nk : std::clamp<int64_t>(visible_end(s, sb, q0 + qi) - ch.j0 - c0, 0, nk);
            acc_t* srow = sbuf.data() + r * Bk;
            probs_from_lse(srow, gam.data() + hh * Kc + c0, bet.data() + hh * Kc + c0, lse_r[r], n_vis, nk);
            axpy_row(km.data() + hh * Kc + c0, w_r[r], srow, nk);
          }
        }
      }

      for (int64_t hh = 0; hh < rep; ++hh) {
        const int64_t h = kvh * rep + hh;
        for (int64_t c = 0; c < nc; ++c)
          kp.key_mass[b * kp.km_batch_stride + (sb.k_start + ch.j0 + c) * kp.km_row_stride + h * kp.km_head_stride] =
              static_cast<float>(km[hh * Kc + c]);
      }
    }
  });
}

}  // namespace

void attention_key_mass(const KeyMassParams& p, at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return key_mass_impl<float>(p);
    case at::kBFloat16:
      return key_mass_impl<at::BFloat16>(p);
    case at::kDouble:
      return key_mass_impl<double>(p);
    default:
      TORCH_CHECK(false, "avar: CPU attention_key_mass has no kernel for dtype ", dtype);
  }
}

}  // namespace avar::cpu
