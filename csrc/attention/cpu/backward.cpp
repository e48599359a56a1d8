// CPU backward: FlashAttention-2's backward with the mass terms of docs/design.md ("The op"), P recomputed tile by tile
// from the saved LSE.
//
// One task = (sequence b, kv head, split). The rep = H / H_kv query heads sharing the kv head are stacked as
// rows of one tile (as in the forward). A task walks its query blocks (blocks split, split + n_splits, ...);
// each query block walks the key blocks it can see, keeping dQ of the block in a tile and adding into dK/dV
// accumulators that cover the whole key range of the sequence and belong to the task. So no two threads
// write the same memory: with one split per (b, kv head) the task stores dK/dV itself, otherwise each split
// leaves fp32 partials that a short second pass sums. K and V are converted (and transposed) once per task.
//
// dmass enters through indicator columns: dO is extended with dmass[i, :] and Vᵀ with one-hot rows of the key
// groups, so the dP GEMM yields dO·vⱼ + dmass[i, g(j)] directly.
//
// bf16 inputs, where the bf16 GEMM runs (bf16_pair_gemm_available), multiply in bf16 like the forward: Q, K, V
// and dO stay bf16 (Q unscaled; the scale enters the raw scores and dK in fp32), P and dS·γ are rounded to bf16
// as the A operands of dV, dQ and dK, and every B operand is pair-interleaved along its reduction. Softmax, D,
// the dmass term (an fp32 GEMM against the key groups' one-hot rows) and all accumulators stay fp32. Elsewhere
// bf16 runs the fp32 path.
#include "cpu_kernels.h"
#include "grad_row_ops.h"

namespace avar::cpu {
namespace {

struct BwdTask {
  int64_t b, kvh, split, cost;
};

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Tasks the backward aims for when there are few (b, kv head) pairs. The split count depends on the problem
// only, never on the thread count, so dK/dV (whose split partials are summed in split order) are bit-identical
// whatever the threads; 16 tasks keep up to 8 threads busy with dynamic claiming.
constexpr int64_t kBackwardTaskTarget = 16;

// More splits than one per (b, kv head) only when there are fewer of those than the task target.
int64_t choose_splits(const SeqLayout& s, int64_t block_q) {
  const int64_t units = std::max<int64_t>(1, s.batch * s.kv_heads);
  return std::clamp<int64_t>(ceil_div(kBackwardTaskTarget, units), 1,
                             std::max<int64_t>(1, ceil_div(s.seqlen_q, block_q)));
}

// Tasks, most expensive first so that dynamic claiming balances the threads.
std::vector<BwdTask> backward_tasks(const SeqLayout& s, int64_t block_q, int64_t n_splits) {
  std::vector<BwdTask> tasks;
  for (int64_t b = 0; b < s.batch; ++b) {
    const SeqBounds sb = seq_bounds(s, b);
    for (int64_t split = 0; split < n_splits; ++split) {
      int64_t cost = 0;
      for (int64_t q0 = split * block_q; q0 < sb.len_q; q0 += n_splits * block_q) {
        const int64_t q1 = std::min(sb.len_q, q0 + block_q);
        cost += (q1 - q0) * visible_end(s, sb, q1 - 1);
      }
      for (int64_t kvh = 0; kvh < s.kv_heads; ++kvh) tasks.push_back({b, kvh, split, cost + sb.len_k});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const BwdTask& a, const BwdTask& c) { return a.cost > c.cost; });
  return tasks;
}

template <typename scalar_t, bool kPairs>
void backward_impl(const AttnBwdParams& bp, bool emulated) {
  using acc_t = typename AccType<scalar_t>::type;
  using bf16 = at::BFloat16;
  const AttnFwdParams& p = bp.fwd;
  const SeqLayout& s = p.seq;
  const int64_t rep = s.heads / s.kv_heads;
  const int64_t D = s.head_dim, G = kNumGroups;
  const bool with_dmass = bp.dmass != nullptr;
  const int64_t De = with_dmass ? D + G : D;  // dO | dmass columns, and V | group-indicator columns
  const int64_t Bq = query_block_rows(rep), Bk = kKeyBlock;
  const int64_t max_rows = rep * Bq;
  const int64_t Lk = s.seqlen_k;  // longest key sequence: leading dimension of the per-task key buffers
  const int64_t Lk_pad = ceil_div(Lk, Bk) * Bk;
  const bool tables = bp.dbias != nullptr || bp.dlogit_scale != nullptr;
  const acc_t scale = static_cast<acc_t>(s.scale);
  // bf16 GEMM path: the head dim and the stacked query rows are reduction lengths there, rounded up to even.
  const int64_t Dk = round_up_even(D), rows_pad = round_up_even(max_rows);

  const int64_t n_splits = choose_splits(s, Bq);
  const std::vector<BwdTask> tasks = backward_tasks(s, Bq, n_splits);
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());

  // Split partials: [n_splits, B, H_kv, Lk, 2 (dK, dV), D] fp32; only allocated when splitting.
  const int64_t part_stride = Lk * 2 * D;
  std::vector<acc_t> partial(n_splits > 1 ? n_splits * s.batch * s.kv_heads * part_stride : 0);
  // Per-task dβ / dγ sums: [n_tasks, 2, rep, G], reduced serially at the end (tasks share heads).
  std::vector<double> task_tables(tables ? n_tasks * 2 * rep * G : 0, 0.0);

  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  const auto* out = static_cast<const scalar_t*>(p.out);
  const auto* dout = static_cast<const scalar_t*>(bp.dout);
  auto* dq = static_cast<scalar_t*>(bp.dq);
  auto* dk = static_cast<scalar_t*>(bp.dk);
  auto* dv = static_cast<scalar_t*>(bp.dv);

  parallel_tasks(n_tasks, [&](const auto& claim) {
    std::vector<acc_t> kbuf(kPairs ? 0 : Lk * D);  // [Lk, D]  K rows
    // Kᵀ and Vᵀ are stored per key block, [n_blocks, D, Bk], so a GEMM's B operand is one contiguous tile
    // with a short row stride (a stride of Lk, a power of two at the usual lengths, would alias cache sets).
    std::vector<acc_t> kt(kPairs ? 0 : Lk_pad * D);   // [n_blocks, D, Bk]  Kᵀ
    std::vector<acc_t> vt(kPairs ? 0 : Lk_pad * De);  // [n_blocks, D (+G), Bk]  Vᵀ and group indicator rows
    // bf16 GEMM path: bf16 operands, every B operand pair-interleaved along its reduction (common.h), per block.
    std::vector<bf16> kt16(kPairs ? Lk_pad * Dk : 0);                  // [n_blocks, Dk, Bk]  Kᵀ, pairs along D
    std::vector<bf16> vt16(kPairs ? Lk_pad * Dk : 0);                  // [n_blocks, Dk, Bk]  Vᵀ, pairs along D
    std::vector<bf16> kr16(kPairs ? Lk_pad * D : 0);                   // [n_blocks, Bk, D]  K, pairs along keys
    std::vector<acc_t> onehot(kPairs && with_dmass ? Lk_pad * G : 0);  // [n_blocks, G, Bk]  key groups (fp32)
    std::vector<bf16> q16(kPairs ? max_rows * Dk : 0), do16(kPairs ? max_rows * Dk : 0);  // [rows, Dk]  q, dO
    std::vector<bf16> qp(kPairs ? rows_pad * D : 0), dop(kPairs ? rows_pad * D : 0);      // [rows, D]  pairs along rows
    std::vector<bf16> t16(kPairs ? Bk * rows_pad : 0);   // [Bk, rows]  Pᵀ, then (dS·γ)ᵀ
    std::vector<bf16> ds16(kPairs ? max_rows * Bk : 0);  // [rows, Bk]  dS·γ
    std::vector<acc_t> gam(rep * Lk), bet(rep * Lk);     // [rep, Lk]  per-key logit scale and bias
    std::vector<acc_t> dk_acc(Lk * D), dv_acc(Lk * D);   // [Lk, D]
    std::vector<acc_t> col_db(tables ? rep * Lk : 0), col_dg(tables ? rep * Lk : 0);  // [rep, Lk]
    std::vector<int8_t> grp(Lk);
    std::vector<acc_t> qs(kPairs ? 0 : max_rows * D);              // [rows, D]  q · scale
    std::vector<acc_t> doe(max_rows * De);                         // [rows, D (+G)]  dO and dmass
    std::vector<acc_t> dq_acc(max_rows * D);                       // [rows, D]  dQ / scale
    std::vector<acc_t> lse_r(max_rows), d_r(max_rows);             // [rows]
    std::vector<acc_t> sbuf(max_rows * Bk), dpbuf(max_rows * Bk);  // [rows, Bk]  S → P, dP → dS·γ
    std::vector<acc_t> tbuf(Bk * max_rows);                        // [Bk, rows]  Pᵀ, then (dS·γ)ᵀ

    for (int64_t t = claim(); t >= 0; t = claim()) {
      const BwdTask& task = tasks[t];
      const int64_t b = task.b, kvh = task.kvh;
      const SeqBounds sb = seq_bounds(s, b);

      // Keys any query block of this task can see.
      int64_t kv_need = 0;
      for (int64_t q0 = task.split * Bq; q0 < sb.len_q; q0 += n_splits * Bq)
        kv_need = std::max(kv_need, visible_end(s, sb, std::min(sb.len_q, q0 + Bq) - 1));

      if constexpr (kPairs) {
        const int64_t used = ceil_div(kv_need, Bk);  // pad keys and pad rows of the pair layout stay 0
        std::fill_n(kt16.begin(), used * Dk * Bk, bf16(0));
        std::fill_n(vt16.begin(), used * Dk * Bk, bf16(0));
        std::fill_n(kr16.begin(), used * Bk * D, bf16(0));
        std::fill_n(onehot.begin(), with_dmass ? used * G * Bk : 0, acc_t(0));
      }
      for (int64_t j = 0; j < kv_need; ++j) {
        const int64_t row = sb.k_start + j;
        const scalar_t* kp = row_ptr(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, row, kvh);
        const scalar_t* vp = row_ptr(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, row, kvh);
        const int g = key_group_of(p, b, row);
        if constexpr (kPairs) {
          grp[j] = static_cast<int8_t>(g);
          const int64_t blk = j / Bk, c = j % Bk;
          bf16* ktb = kt16.data() + blk * Dk * Bk;
          bf16* vtb = vt16.data() + blk * Dk * Bk;
          bf16* krb = kr16.data() + blk * Bk * D;
          if (g >= 0) {  // a masked key keeps its zero K (see the fp32 path below)
            for (int64_t d = 0; d < D; ++d) {
              ktb[pair_index(d, c, Bk)] = kp[d];
              krb[pair_index(c, d, D)] = kp[d];
            }
            if (with_dmass) onehot[(blk * G + g) * Bk + c] = acc_t(1);
          }
          for (int64_t d = 0; d < D; ++d) vtb[pair_index(d, c, Bk)] = vp[d];
          continue;
        }
        acc_t* kr = kbuf.data() + j * D;
        // A masked key's K is taken as 0: it never enters a score, and dQ += dS·K (dS = 0 there) stays clean.
        if (g >= 0)
          load_row(kp, kr, D, acc_t(1));
        else
          std::fill(kr, kr + D, acc_t(0));
        acc_t* ktj = kt.data() + (j / Bk) * D * Bk + j % Bk;
        acc_t* vtj = vt.data() + (j / Bk) * De * Bk + j % Bk;
        for (int64_t d = 0; d < D; ++d) {
          ktj[d * Bk] = kr[d];
          vtj[d * Bk] = static_cast<acc_t>(vp[d]);
        }
        grp[j] = static_cast<int8_t>(g);
        if (with_dmass)
          for (int64_t gg = 0; gg < G; ++gg) vtj[(D + gg) * Bk] = (gg == g) ? acc_t(1) : acc_t(0);
      }
      for (int64_t hh = 0; hh < rep; ++hh)
        fill_group_columns(p, kv_need, kvh * rep + hh, grp.data(), gam.data() + hh * Lk, bet.data() + hh * Lk);
      std::fill(dk_acc.begin(), dk_acc.begin() + sb.len_k * D, acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.begin() + sb.len_k * D, acc_t(0));
      if (tables) {
        std::fill(col_db.begin(), col_db.end(), acc_t(0));
        std::fill(col_dg.begin(), col_dg.end(), acc_t(0));
      }

      for (int64_t q0 = task.split * Bq; q0 < sb.len_q; q0 += n_splits * Bq) {
        const int64_t nq = std::min(Bq, sb.len_q - q0);
        const int64_t rows = rep * nq;  // row r = hh * nq + qi, head h = kvh * rep + hh

        for (int64_t hh = 0; hh < rep; ++hh) {
          const int64_t h = kvh * rep + hh;
          for (int64_t qi = 0; qi < nq; ++qi) {
            const int64_t r = hh * nq + qi, row = sb.q_start + q0 + qi;
            const float l = p.lse[b * p.lse_batch_stride + row * p.lse_row_stride + h * p.lse_head_stride];
            const bool dead = l == -std::numeric_limits<float>::infinity();
            // A dead row's q is taken as 0: it has no gradient effect, even when it holds NaN (dK += dSᵀ·Q).
            const scalar_t* qsrc = row_ptr(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, row, h);
            const scalar_t* dsrc = row_ptr(dout, bp.do_batch_stride, bp.do_row_stride, bp.do_head_stride, b, row, h);
            if constexpr (kPairs) {
              // Unscaled q in bf16 (scaling would round it); the scale enters the raw scores and dK in fp32.
              bf16* qr = q16.data() + r * Dk;
              bf16* dr = do16.data() + r * Dk;
              for (int64_t d = 0; d < D; ++d) {
                const bf16 qv = dead ? bf16(0) : qsrc[d];
                qr[d] = qv;
                qp[pair_index(r, d, D)] = qv;
                dr[d] = dsrc[d];
                dop[pair_index(r, d, D)] = dsrc[d];
              }
              std::fill(qr + D, qr + Dk, bf16(0));
              std::fill(dr + D, dr + Dk, bf16(0));
            } else if (dead) {
              std::fill(qs.data() + r * D, qs.data() + (r + 1) * D, acc_t(0));
            } else {
              load_row(qsrc, qs.data() + r * D, D, scale);
            }
            acc_t* de = doe.data() + r * De;
            load_row(dsrc, de, D, acc_t(1));
            const scalar_t* o = row_ptr(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, row, h);
            acc_t dsum = 0;
            for (int64_t d = 0; d < D; ++d) dsum += de[d] * static_cast<acc_t>(o[d]);
            if (with_dmass) {
              const float* dm =
                  row_ptr(bp.dmass, bp.dmass_batch_stride, bp.dmass_row_stride, bp.dmass_head_stride, b, row, h);
              const float* ms = row_ptr(p.mass, p.mass_batch_stride, p.mass_row_stride, p.mass_head_stride, b, row, h);
              for (int64_t g = 0; g < G; ++g) {
                de[D + g] = dm[g];
                dsum += static_cast<acc_t>(dm[g]) * static_cast<acc_t>(ms[g]);
              }
            }
            if (bp.dlse != nullptr)
              dsum -= bp.dlse[b * bp.dlse_batch_stride + row * bp.dlse_row_stride + h * bp.dlse_head_stride];
            d_r[r] = dsum;
            // A row that sees no key has lse = −inf; +inf makes its recomputed P (and so its gradient) zero.
            lse_r[r] = dead ? std::numeric_limits<acc_t>::infinity() : static_cast<acc_t>(l);
          }
        }
        std::fill(dq_acc.begin(), dq_acc.begin() + rows * D, acc_t(0));
        const int64_t rp = kPairs ? round_up_even(rows) : rows;  // reduction length of dV and dK
        if constexpr (kPairs)
          if (rp > rows)
            for (int64_t d = 0; d < D; ++d) qp[pair_index(rows, d, D)] = dop[pair_index(rows, d, D)] = bf16(0);

        const int64_t kv_end = visible_end(s, sb, q0 + nq - 1);
        const int64_t first_row_end = visible_end(s, sb, q0);
        for (int64_t j0 = 0; j0 < kv_end; j0 += Bk) {
          const int64_t nk = std::min(Bk, kv_end - j0);
          // The pair layout reduces dQ over an even number of keys: the pad column gets P = dS = 0 below.
          const int64_t nkr = kPairs ? round_up_even(nk) : nk;
          const int64_t blk = j0 / Bk;
          if constexpr (kPairs) {
            gemm_pairs(rows, nkr, Dk, q16.data(), Dk, kt16.data() + blk * Dk * Bk, Bk, sbuf.data(), Bk,
                       /*accumulate=*/false, emulated);
            gemm_pairs(rows, nkr, Dk, do16.data(), Dk, vt16.data() + blk * Dk * Bk, Bk, dpbuf.data(), Bk,
                       /*accumulate=*/false, emulated);
            // dmass[i, g(j)] in fp32 (dmass is fp32 and would round in bf16).
            if (with_dmass)
              gemm(rows, nkr, G, doe.data() + D, De, onehot.data() + blk * G * Bk, Bk, dpbuf.data(), Bk,
                   /*accumulate=*/true);
          } else {
            gemm(rows, nk, D, qs.data(), D, kt.data() + j0 * D, Bk, sbuf.data(), Bk, /*accumulate=*/false);
            gemm(rows, nk, De, doe.data(), De, vt.data() + j0 * De, Bk, dpbuf.data(), Bk, /*accumulate=*/false);
          }
          const acc_t raw_mul = kPairs ? scale : acc_t(1);

          const bool all_visible = j0 + nk <= first_row_end;  // no causal cut inside this tile
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t hh = r / nq, qi = r % nq;
            const int64_t n_vis = all_visible ? nk : std::clamp<int64_t>(visible_end(s, sb, q0 + qi) - j0, 0, nk);
            const int64_t col = hh * Lk + j0;
            if (tables) {
              softmax_grad_row<true>(sbuf.data() + r * Bk, dpbuf.data() + r * Bk, gam.data() + col, bet.data() + col,
                                     lse_r[r], d_r[r], raw_mul, n_vis, nkr, col_db.data() + col, col_dg.data() + col);
            } else {
              softmax_grad_row<false, acc_t>(sbuf.data() + r * Bk, dpbuf.data() + r * Bk, gam.data() + col,
                                             bet.data() + col, lse_r[r], d_r[r], raw_mul, n_vis, nkr, nullptr, nullptr);
            }
          }

          if constexpr (kPairs) {
            // [nk, rows] fp32 → [nk, rp] bf16 with a zero pad column.
            auto to_bf16_t = [&]() {
              for (int64_t c = 0; c < nk; ++c) {
                at::vec::convert(tbuf.data() + c * rows, t16.data() + c * rp, rows);
                if (rp > rows) t16[c * rp + rows] = bf16(0);
              }
            };
            // dV += Pᵀ·dO with P rounded to bf16, as the forward's P·V.
            transpose_tile(sbuf.data(), Bk, tbuf.data(), rows, rows, nk);
            to_bf16_t();
            gemm_pairs(nk, D, rp, t16.data(), rp, dop.data(), D, dv_acc.data() + j0 * D, D, /*accumulate=*/true,
                       emulated);
            for (int64_t r = 0; r < rows; ++r) at::vec::convert(dpbuf.data() + r * Bk, ds16.data() + r * Bk, nkr);
            gemm_pairs(rows, D, nkr, ds16.data(), Bk, kr16.data() + blk * Bk * D, D, dq_acc.data(), D,
                       /*accumulate=*/true, emulated);
            transpose_tile(dpbuf.data(), Bk, tbuf.data(), rows, rows, nk);
            to_bf16_t();
            gemm_pairs(nk, D, rp, t16.data(), rp, qp.data(), D, dk_acc.data() + j0 * D, D, /*accumulate=*/true,
                       emulated);
          } else {
            transpose_tile(sbuf.data(), Bk, tbuf.data(), rows, rows, nk);
            gemm(nk, D, rows, tbuf.data(), rows, doe.data(), De, dv_acc.data() + j0 * D, D, /*accumulate=*/true);
            gemm(rows, D, nk, dpbuf.data(), Bk, kbuf.data() + j0 * D, D, dq_acc.data(), D, /*accumulate=*/true);
            transpose_tile(dpbuf.data(), Bk, tbuf.data(), rows, rows, nk);
            gemm(nk, D, rows, tbuf.data(), rows, qs.data(), D, dk_acc.data() + j0 * D, D, /*accumulate=*/true);
          }
        }

        for (int64_t hh = 0; hh < rep; ++hh) {
          for (int64_t qi = 0; qi < nq; ++qi) {
            const int64_t row = sb.q_start + q0 + qi;
            scalar_t* dst =
                row_ptr(dq, bp.dq_batch_stride, bp.dq_row_stride, bp.dq_head_stride, b, row, kvh * rep + hh);
            store_row(dq_acc.data() + (hh * nq + qi) * D, dst, D, scale);
          }
        }
      }

      if constexpr (kPairs) scale_row(dk_acc.data(), scale, sb.len_k * D);  // q entered dK unscaled
      if (n_splits == 1) {
        for (int64_t j = 0; j < sb.len_k; ++j) {
          const int64_t row = sb.k_start + j;
          store_row(dk_acc.data() + j * D,
                    row_ptr(dk, bp.dk_batch_stride, bp.dk_row_stride, bp.dk_head_stride, b, row, kvh), D, acc_t(1));
          store_row(dv_acc.data() + j * D,
                    row_ptr(dv, bp.dv_batch_stride, bp.dv_row_stride, bp.dv_head_stride, b, row, kvh), D, acc_t(1));
        }
      } else {
        acc_t* part = partial.data() + ((task.split * s.batch + b) * s.kv_heads + kvh) * part_stride;
        for (int64_t j = 0; j < sb.len_k; ++j) {
          std::copy_n(dk_acc.data() + j * D, D, part + j * 2 * D);
          std::copy_n(dv_acc.data() + j * D, D, part + j * 2 * D + D);
        }
      }

      if (tables) {
        double* tab = task_tables.data() + t * 2 * rep * G;  // [2, rep, G]
        for (int64_t hh = 0; hh < rep; ++hh) {
          for (int64_t j = 0; j < kv_need; ++j) {
            const int g = grp[j];
            if (g < 0) continue;  // masked keys have P = 0 and so dS = 0
            tab[hh * G + g] += col_db[hh * Lk + j];
            tab[(rep + hh) * G + g] += col_dg[hh * Lk + j];
          }
        }
      }
    }
  });

  if (n_splits > 1) {
    at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(2 * D);
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / s.kv_heads, kvh = u % s.kv_heads;
        const SeqBounds sb = seq_bounds(s, b);
        for (int64_t j = 0; j < sb.len_k; ++j) {
          std::fill(sum.begin(), sum.end(), acc_t(0));
          for (int64_t sp = 0; sp < n_splits; ++sp) {
            const acc_t* part = partial.data() + (sp * s.batch * s.kv_heads + u) * part_stride + j * 2 * D;
            for (int64_t d = 0; d < 2 * D; ++d) sum[d] += part[d];
          }
          const int64_t row = sb.k_start + j;
          store_row(sum.data(), row_ptr(dk, bp.dk_batch_stride, bp.dk_row_stride, bp.dk_head_stride, b, row, kvh), D,
                    acc_t(1));
          store_row(sum.data() + D, row_ptr(dv, bp.dv_batch_stride, bp.dv_row_stride, bp.dv_head_stride, b, row, kvh),
                    D, acc_t(1));
        }
      }
    });
  }

  if (tables) {
    std::vector<double> sums(2 * s.heads * G, 0.0);  // [2, H, G]
    for (int64_t t = 0; t < n_tasks; ++t) {
      const double* tab = task_tables.data() + t * 2 * rep * G;
      for (int64_t which = 0; which < 2; ++which)
        for (int64_t hh = 0; hh < rep; ++hh)
          for (int64_t g = 0; g < G; ++g)
            sums[(which * s.heads + tasks[t].kvh * rep + hh) * G + g] += tab[(which * rep + hh) * G + g];
    }
    for (int64_t i = 0; i < s.heads * G; ++i) {
      if (bp.dbias != nullptr) bp.dbias[i] += static_cast<float>(sums[i]);
      if (bp.dlogit_scale != nullptr) bp.dlogit_scale[i] += static_cast<float>(sums[s.heads * G + i]);
    }
  }
}

}  // namespace

void attention_bwd(const AttnBwdParams& p, at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return backward_impl<float, false>(p, false);
    case at::kBFloat16: {
      const bool emulated = pair_gemm_emulated();
      if (emulated || bf16_pair_gemm_available()) return backward_impl<at::BFloat16, true>(p, emulated);
      return backward_impl<at::BFloat16, false>(p, false);
    }
    case at::kDouble:
      return backward_impl<double, false>(p, false);
    default:
      TORCH_CHECK(false, "avar: CPU attention_bwd has no kernel for dtype ", dtype);
  }
}

}  // namespace avar::cpu
