// CPU forward: tiled online softmax with per-(head, group) logit scale and bias, and per-group masses.
//
// K/V are first packed per (kv head, key block) (packed_kv.h). Then one task = (sequence b, kv head, query block). The
// rep = H / H_kv query heads that share the kv head are stacked as rows of one tile, so each K/V tile is loaded once
// for all of them and the GEMMs are tall. V is extended with G indicator columns (one-hot of the key's group): the same
// P·V GEMM then accumulates the unnormalised group masses a[g], and the softmax denominator is l = Σ_g a[g] (masked
// keys have p = 0).
//
// bf16 inputs, where the bf16 GEMM runs (bf16_pair_gemm_available), keep Q, K and V in bf16 and round P to
// bf16 before P·V, as PyTorch's own bf16 attention does; scores, softmax and accumulators stay fp32. Out and
// masses are normalised by the sum of the rounded p (the same weights that built them, so masses sum to 1);
// lse uses the sum of the unrounded p, so it carries no bf16 rounding. Elsewhere bf16 runs the fp32 path.
#include "cpu_kernels.h"
#include "packed_kv.h"
#include "row_ops.h"

namespace avar::cpu {
namespace {

struct QueryBlock {
  int64_t b, q0, cost;
};

// Query blocks of every sequence, most expensive first so that dynamic claiming balances the threads.
std::vector<QueryBlock> query_blocks(const SeqLayout& s, int64_t block) {
  std::vector<QueryBlock> blocks;
  for (int64_t b = 0; b < s.batch; ++b) {
    const SeqBounds sb = seq_bounds(s, b);
    for (int64_t q0 = 0; q0 < sb.len_q; q0 += block) {
      const int64_t q1 = std::min(sb.len_q, q0 + block);
      blocks.push_back({b, q0, (q1 - q0) * visible_end(s, sb, q1 - 1)});
    }
  }
  std::stable_sort(blocks.begin(), blocks.end(),
                   [](const QueryBlock& a, const QueryBlock& c) { return a.cost > c.cost; });
  return blocks;
}

template <typename scalar_t, bool kPairs>
void forward_impl(const AttnFwdParams& p, bool emulated) {
  using acc_t = typename AccType<scalar_t>::type;
  using mat_t = typename PackedKV<scalar_t, kPairs>::mat_t;  // GEMM operand type
  const SeqLayout& s = p.seq;
  const int64_t rep = s.heads / s.kv_heads;
  const int64_t D = s.head_dim, G = kNumGroups, Dv = D + G;
  const int64_t Bq = query_block_rows(rep), Bk = kKeyBlock;
  const int64_t max_rows = rep * Bq;
  const std::vector<QueryBlock> blocks = query_blocks(s, Bq);
  const int64_t n_tasks = static_cast<int64_t>(blocks.size()) * s.kv_heads;

  const std::vector<int64_t> first_live = first_live_keys(p);  // [B]
  const auto* q = static_cast<const scalar_t*>(p.q);
  PackedKV<scalar_t, kPairs> kv(p, Bk);  // K/V converted and tiled once, shared by all query-block tasks
  const int64_t Dk = kv.key_rows();      // D, or D rounded up to even for the pair layout
  auto* out = static_cast<scalar_t*>(p.out);

  parallel_tasks(n_tasks, [&](const auto& claim) {
    std::vector<mat_t> qbuf(max_rows * Dk);               // [rows, Dk], pre-scaled by `scale` unless kPairs (zero pad)
    std::vector<acc_t> sbuf(max_rows * Bk);               // [rows, Bk]  scores, then probabilities
    std::vector<mat_t> pbuf(kPairs ? max_rows * Bk : 0);  // [rows, Bk]  probabilities rounded to bf16
    std::vector<acc_t> acc(max_rows * Dv);                // [rows, D + G]  unnormalised out and group masses
    std::vector<acc_t> mrow(max_rows);                    // [rows]  running max
    std::vector<acc_t> lrow(kPairs ? max_rows : 0);       // [rows]  running Σ p before rounding (for lse)

    for (int64_t t = claim(); t >= 0; t = claim()) {
      const QueryBlock& qb = blocks[t / s.kv_heads];
      const int64_t kvh = t % s.kv_heads;
      const int64_t b = qb.b;
      const SeqBounds sb = seq_bounds(s, b);
      const int64_t nq = std::min(Bq, sb.len_q - qb.q0);
      const int64_t rows = rep * nq;  // row r = hh * nq + qi, head h = kvh * rep + hh

      for (int64_t hh = 0; hh < rep; ++hh) {
        const int64_t h = kvh * rep + hh;
        for (int64_t qi = 0; qi < nq; ++qi) {
          const scalar_t* src =
              row_ptr(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, sb.q_start + qb.q0 + qi, h);
          mat_t* dst = qbuf.data() + (hh * nq + qi) * Dk;
          if constexpr (kPairs) {
            std::copy(src, src + D, dst);
            std::fill(dst + D, dst + Dk, mat_t(0));
          } else {
            load_row(src, dst, D, static_cast<acc_t>(s.scale));
          }
        }
      }
      std::fill(acc.begin(), acc.begin() + rows * Dv, acc_t(0));
      std::fill(mrow.begin(), mrow.begin() + rows, neg_inf<acc_t>());
      if constexpr (kPairs) std::fill(lrow.begin(), lrow.begin() + rows, acc_t(0));

      const int64_t kv_end = visible_end(s, sb, qb.q0 + nq - 1);
      const int64_t first_row_end = visible_end(s, sb, qb.q0);
      for (int64_t j0 = 0; j0 < kv_end; j0 += Bk) {
        const int64_t nk = std::min(Bk, kv_end - j0);
        // The pair layout reduces over an even number of keys: the pad column is a zero key with p = 0.
        const int64_t nkr = kPairs ? round_up_even(nk) : nk;
        const auto tile = kv.tile(kvh, kv.block_of(b, j0));
        if constexpr (kPairs)
          gemm_pairs(rows, nkr, Dk, qbuf.data(), Dk, tile.kt, Bk, sbuf.data(), Bk, /*accumulate=*/false, emulated);
        else
          gemm(rows, nk, D, qbuf.data(), D, tile.kt, Bk, sbuf.data(), Bk, /*accumulate=*/false);

        const bool all_visible = j0 + nk <= first_row_end;  // no causal cut inside this tile
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t hh = r / nq, qi = r % nq;
          const int64_t n_vis = all_visible ? nk : std::clamp<int64_t>(visible_end(s, sb, qb.q0 + qi) - j0, 0, nk);
          acc_t* srow = sbuf.data() + r * Bk;
          const acc_t tile_max = bias_and_max(srow, tile.gamma + hh * Bk, tile.beta + hh * Bk, n_vis, nkr);
          const acc_t m_new = std::max(mrow[r], tile_max);
          if (m_new == neg_inf<acc_t>()) {
            if constexpr (kPairs)
              std::fill(pbuf.data() + r * Bk, pbuf.data() + r * Bk + nkr, mat_t(0));
            else
              std::fill(srow, srow + nk, acc_t(0));
            continue;
          }
          if (mrow[r] != m_new) {
            const acc_t alpha = std::exp(mrow[r] - m_new);  // 0 when the row had no visible key yet
            scale_row(acc.data() + r * Dv, alpha, Dv);
            if constexpr (kPairs) lrow[r] *= alpha;
            mrow[r] = m_new;
          }
          if constexpr (kPairs) {
            lrow[r] += exp_shifted_sum(srow, m_new, nkr);
            at::vec::convert(srow, pbuf.data() + r * Bk, nkr);
          } else {
            exp_shifted(srow, m_new, nk);
          }
        }

        if constexpr (kPairs)
          gemm_pairs(rows, Dv, nkr, pbuf.data(), Bk, tile.vext, Dv, acc.data(), Dv, /*accumulate=*/true, emulated);
        else
          gemm(rows, Dv, nk, sbuf.data(), Bk, tile.vext, Dv, acc.data(), Dv, /*accumulate=*/true);
      }

      for (int64_t hh = 0; hh < rep; ++hh) {
        const int64_t h = kvh * rep + hh;
        for (int64_t qi = 0; qi < nq; ++qi) {
          const int64_t r = hh * nq + qi, row = sb.q_start + qb.q0 + qi;
          const acc_t* a = acc.data() + r * Dv;
          acc_t l = 0;
          for (int64_t g = 0; g < G; ++g) l += a[D + g];
          acc_t l_lse = l;
          if constexpr (kPairs) l_lse = lrow[r];
          // Dead (no visible key): out 0, lse −inf, mass 0. A row that sees keys but whose running max is not
          // finite (a NaN score, a score that overflowed to +inf, or every score −inf) is NaN throughout, as
          // softmax itself would give; it must never pass for a dead row.
          const bool alive = visible_end(s, sb, qb.q0 + qi) > first_live[b];
          const bool finite = std::isfinite(mrow[r]);
          const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
          const acc_t inv = finite ? acc_t(1) / l : nan;
          scalar_t* o = row_ptr(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, row, h);
          float* ms = p.mass == nullptr
                          ? nullptr
                          : row_ptr(p.mass, p.mass_batch_stride, p.mass_row_stride, p.mass_head_stride, b, row, h);
          float& lse = p.lse[b * p.lse_batch_stride + row * p.lse_row_stride + h * p.lse_head_stride];
          if (!alive) {
            // Written, not scaled by 0: the accumulator may hold 0·NaN from a masked key's V.
            std::fill(o, o + D, scalar_t(0));
            lse = -std::numeric_limits<float>::infinity();
            if (ms != nullptr) std::fill(ms, ms + G, 0.f);
            continue;
          }
          store_row(a, o, D, inv);
          lse = static_cast<float>(finite ? mrow[r] + std::log(l_lse) : nan);
          if (ms != nullptr)
            for (int64_t g = 0; g < G; ++g) ms[g] = static_cast<float>(a[D + g] * inv);
        }
      }
    }
  });
}

}  // namespace

void attention_fwd(const AttnFwdParams& p, at::ScalarType dtype) {
  if (decode_applies(p, dtype)) return attention_fwd_decode(p, dtype);
  switch (dtype) {
    case at::kFloat:
      return forward_impl<float, false>(p, false);
    case at::kBFloat16: {
      const bool emulated = pair_gemm_emulated();
      if (emulated || bf16_pair_gemm_available()) return forward_impl<at::BFloat16, true>(p, emulated);
      return forward_impl<at::BFloat16, false>(p, false);
    }
    case at::kDouble:
      return forward_impl<double, false>(p, false);
    default:
      TORCH_CHECK(false, "avar: CPU attention_fwd has no kernel for dtype ", dtype);
  }
}

}  // namespace avar::cpu
