// CPU backward: FlashAttention-2's backward with the mass terms of DESIGN §2, P recomputed tile by tile
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
#include "cpu_kernels.h"
#include "grad_row_ops.h"

namespace avar::cpu {
namespace {

struct BwdTask {
  int64_t b, kvh, split, cost;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

template <typename scalar_t>
void backward_impl(const AttnBwdParams& bp) {
  using acc_t = typename AccType<scalar_t>::type;
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
    std::vector<acc_t> kbuf(Lk * D);                // [Lk, D]  K rows
    // Kᵀ and Vᵀ are stored per key block, [n_blocks, D, Bk], so a GEMM's B operand is one contiguous tile
    // with a short row stride (a stride of Lk, a power of two at the usual lengths, would alias cache sets).
    std::vector<acc_t> kt(Lk_pad * D);   // [n_blocks, D, Bk]  Kᵀ
    std::vector<acc_t> vt(Lk_pad * De);  // [n_blocks, D (+G), Bk]  Vᵀ and group indicator rows
    std::vector<acc_t> gam(rep * Lk), bet(rep * Lk);  // [rep, Lk]  per-key logit scale and bias
    std::vector<acc_t> dk_acc(Lk * D), dv_acc(Lk * D);  // [Lk, D]
    std::vector<acc_t> col_db(tables ? rep * Lk : 0), col_dg(tables ? rep * Lk : 0);  // [rep, Lk]
    std::vector<int8_t> grp(Lk);
    std::vector<acc_t> qs(max_rows * D);    // [rows, D]  q · scale
    std::vector<acc_t> doe(max_rows * De);  // [rows, D (+G)]  dO and dmass
    std::vector<acc_t> dq_acc(max_rows * D);  // [rows, D]  dQ / scale
    std::vector<acc_t> lse_r(max_rows), d_r(max_rows);  // [rows]
    std::vector<acc_t> sbuf(max_rows * Bk), dpbuf(max_rows * Bk);  // [rows, Bk]  S → P, dP → dS·γ
    std::vector<acc_t> tbuf(Bk * max_rows);  // [Bk, rows]  Pᵀ, then (dS·γ)ᵀ

    for (int64_t t = claim(); t >= 0; t = claim()) {
      const BwdTask& task = tasks[t];
      const int64_t b = task.b, kvh = task.kvh;
      const SeqBounds sb = seq_bounds(s, b);

      // Keys any query block of this task can see.
      int64_t kv_need = 0;
      for (int64_t q0 = task.split * Bq; q0 < sb.len_q; q0 += n_splits * Bq)
        kv_need = std::max(kv_need, visible_end(s, sb, std::min(sb.len_q, q0 + Bq) - 1));

      for (int64_t j = 0; j < kv_need; ++j) {
        const int64_t row = sb.k_start + j;
        const scalar_t* kp = row_ptr(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, row, kvh);
        const scalar_t* vp = row_ptr(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, row, kvh);
        const int g = key_group_of(p, b, row);
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
            if (dead)
              std::fill(qs.data() + r * D, qs.data() + (r + 1) * D, acc_t(0));
            else
              load_row(row_ptr(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, row, h), qs.data() + r * D, D,
                       scale);
            acc_t* de = doe.data() + r * De;
            load_row(row_ptr(dout, bp.do_batch_stride, bp.do_row_stride, bp.do_head_stride, b, row, h), de, D,
                     acc_t(1));
            const scalar_t* o = row_ptr(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, row, h);
            acc_t dsum = 0;
            for (int64_t d = 0; d < D; ++d) dsum += de[d] * static_cast<acc_t>(o[d]);
            if (with_dmass) {
              const float* dm = row_ptr(bp.dmass, bp.dmass_batch_stride, bp.dmass_row_stride, bp.dmass_head_stride,
                                        b, row, h);
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

        const int64_t kv_end = visible_end(s, sb, q0 + nq - 1);
        const int64_t first_row_end = visible_end(s, sb, q0);
        for (int64_t j0 = 0; j0 < kv_end; j0 += Bk) {
          const int64_t nk = std::min(Bk, kv_end - j0);
          gemm(rows, nk, D, qs.data(), D, kt.data() + j0 * D, Bk, sbuf.data(), Bk, /*accumulate=*/false);
          gemm(rows, nk, De, doe.data(), De, vt.data() + j0 * De, Bk, dpbuf.data(), Bk, /*accumulate=*/false);

          const bool all_visible = j0 + nk <= first_row_end;  // no causal cut inside this tile
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t hh = r / nq, qi = r % nq;
            const int64_t n_vis = all_visible ? nk : std::clamp<int64_t>(visible_end(s, sb, q0 + qi) - j0, 0, nk);
            const int64_t col = hh * Lk + j0;
            if (tables) {
              softmax_grad_row<true>(sbuf.data() + r * Bk, dpbuf.data() + r * Bk, gam.data() + col, bet.data() + col,
                                     lse_r[r], d_r[r], acc_t(1), n_vis, nk, col_db.data() + col,
                                     col_dg.data() + col);
            } else {
              softmax_grad_row<false, acc_t>(sbuf.data() + r * Bk, dpbuf.data() + r * Bk, gam.data() + col,
                                             bet.data() + col, lse_r[r], d_r[r], acc_t(1), n_vis, nk, nullptr,
                                             nullptr);
            }
          }

          transpose_tile(sbuf.data(), Bk, tbuf.data(), rows, rows, nk);
          gemm(nk, D, rows, tbuf.data(), rows, doe.data(), De, dv_acc.data() + j0 * D, D, /*accumulate=*/true);
          gemm(rows, D, nk, dpbuf.data(), Bk, kbuf.data() + j0 * D, D, dq_acc.data(), D, /*accumulate=*/true);
          transpose_tile(dpbuf.data(), Bk, tbuf.data(), rows, rows, nk);
          gemm(nk, D, rows, tbuf.data(), rows, qs.data(), D, dk_acc.data() + j0 * D, D, /*accumulate=*/true);
        }

        for (int64_t hh = 0; hh < rep; ++hh) {
          for (int64_t qi = 0; qi < nq; ++qi) {
            const int64_t row = sb.q_start + q0 + qi;
            scalar_t* dst = row_ptr(dq, bp.dq_batch_stride, bp.dq_row_stride, bp.dq_head_stride, b, row, kvh * rep + hh);
            store_row(dq_acc.data() + (hh * nq + qi) * D, dst, D, scale);
          }
        }
      }

      if (n_splits == 1) {
        for (int64_t j = 0; j < sb.len_k; ++j) {
          const int64_t row = sb.k_start + j;
          store_row(dk_acc.data() + j * D, row_ptr(dk, bp.dk_batch_stride, bp.dk_row_stride, bp.dk_head_stride, b, row, kvh),
                    D, acc_t(1));
          store_row(dv_acc.data() + j * D, row_ptr(dv, bp.dv_batch_stride, bp.dv_row_stride, bp.dv_head_stride, b, row, kvh),
                    D, acc_t(1));
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
    case at::kFloat: return backward_impl<float>(p);
    case at::kBFloat16: return backward_impl<at::BFloat16>(p);
    case at::kDouble: return backward_impl<double>(p);
    default: TORCH_CHECK(false, "avar: CPU attention_bwd has no kernel for dtype ", dtype);
  }
}

}  // namespace avar::cpu
