// K and V of every (kv head, key block), converted once and laid out the way the GEMMs read them, so that the
// query-block tasks (which each sweep many key blocks) neither transpose nor convert anything in their inner
// loop. Memory is linear in Lk.
//
// Two layouts: plain (operands in the accumulator type, row-major) and, for bf16 inputs when the bf16 GEMM is
// available, pair-interleaved bf16 (see gemm_pairs in common.h): operands stay bf16 and exact, the GEMMs run
// at twice the fp32 rate.
#pragma once

#include <memory>

#include "common.h"

namespace avar::cpu {

template <typename scalar_t, bool kPairs = false>
class PackedKV {
  static_assert(!kPairs || std::is_same_v<scalar_t, at::BFloat16>, "the pair-interleaved layout is bf16 only");

 public:
  using acc_t = typename AccType<scalar_t>::type;
  using mat_t = std::conditional_t<kPairs, at::BFloat16, acc_t>;  // GEMM operand type

  // One tile: kt = K transposed [Dk, Bk] | vext [Bk, D + G] (V and one-hot group columns) |
  //           gamma [rep, Bk] | beta [rep, Bk] (per-column logit scale and bias of each stacked head).
  // Pair layout: Dk = D rounded up to even (the pad row is 0), and gamma also carries the softmax scale
  // because the queries are then used unscaled (scaling them in bf16 would round them).
  struct Tile {
    mat_t* kt;
    mat_t* vext;
    acc_t* gamma;
    acc_t* beta;
  };

  PackedKV(const AttnFwdParams& p, int64_t key_block) {
    const SeqLayout& s = p.seq;
    D_ = s.head_dim;
    Dk_ = kPairs ? round_up_even(D_) : D_;
    Dv_ = D_ + kNumGroups;
    Bk_ = key_block;
    TORCH_CHECK(!kPairs || Bk_ % 2 == 0, "avar: the pair-interleaved key block must be even, got ", Bk_);
    rep_ = s.heads / s.kv_heads;
    mat_elems_ = Dk_ * Bk_ + Bk_ * Dv_;
    table_elems_ = 2 * rep_ * Bk_;
    block_base_.resize(s.batch + 1, 0);
    for (int64_t b = 0; b < s.batch; ++b) {
      const int64_t len_k = seq_bounds(s, b).len_k;
      block_base_[b + 1] = block_base_[b] + (len_k + Bk_ - 1) / Bk_;
    }
    n_blocks_ = block_base_[s.batch];
    // every tile fills itself
    mats_.reset(new mat_t[static_cast<size_t>(s.kv_heads * n_blocks_ * mat_elems_)]);
    tables_.reset(new acc_t[static_cast<size_t>(s.kv_heads * n_blocks_ * table_elems_)]);

    // Which (sequence, first key) each global block index stands for.
    std::vector<std::pair<int64_t, int64_t>> blocks;
    blocks.reserve(n_blocks_);
    for (int64_t b = 0; b < s.batch; ++b)
      for (int64_t j0 = 0; j0 < seq_bounds(s, b).len_k; j0 += Bk_) blocks.emplace_back(b, j0);

    const auto* k = static_cast<const scalar_t*>(p.k);
    const auto* v = static_cast<const scalar_t*>(p.v);
    parallel_tasks(s.kv_heads * n_blocks_, [&](const auto& claim) {
      std::vector<int8_t> grp(Bk_);
      for (int64_t t = claim(); t >= 0; t = claim()) {
        const int64_t kvh = t / n_blocks_, blk = t % n_blocks_;
        const auto [b, j0] = blocks[blk];
        const SeqBounds sb = seq_bounds(s, b);
        const int64_t nk = std::min(Bk_, sb.len_k - j0);
        Tile tl = tile(kvh, blk);
        std::fill(tl.kt, tl.kt + mat_elems_, mat_t(0));
        std::fill(tl.gamma, tl.gamma + table_elems_, acc_t(0));
        for (int64_t c = 0; c < nk; ++c) {
          const int64_t row = sb.k_start + j0 + c;
          const scalar_t* kp = row_ptr(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, row, kvh);
          const scalar_t* vp = row_ptr(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, row, kvh);
          const int g = key_group_of(p, b, row);
          grp[c] = static_cast<int8_t>(g);
          // A masked key keeps its zero K column (see bias_and_max): garbage in padding never enters a score.
          if constexpr (kPairs) {
            if (g >= 0)
              for (int64_t d = 0; d < D_; ++d) tl.kt[pair_index(d, c, Bk_)] = kp[d];
            for (int64_t d = 0; d < D_; ++d) tl.vext[pair_index(c, d, Dv_)] = vp[d];
            if (g >= 0) tl.vext[pair_index(c, D_ + g, Dv_)] = at::BFloat16(1.f);
          } else {
            if (g >= 0)
              for (int64_t d = 0; d < D_; ++d) tl.kt[d * Bk_ + c] = static_cast<acc_t>(kp[d]);
            acc_t* ve = tl.vext + c * Dv_;
            load_row(vp, ve, D_, acc_t(1));
            if (g >= 0) ve[D_ + g] = acc_t(1);
          }
        }
        for (int64_t hh = 0; hh < rep_; ++hh) {
          acc_t* gam = tl.gamma + hh * Bk_;
          fill_group_columns(p, nk, kvh * rep_ + hh, grp.data(), gam, tl.beta + hh * Bk_);
          if constexpr (kPairs)
            for (int64_t c = 0; c < nk; ++c) gam[c] *= static_cast<acc_t>(s.scale);
        }
      }
    });
  }

  Tile tile(int64_t kvh, int64_t global_block) {
    mat_t* m = mats_.get() + (kvh * n_blocks_ + global_block) * mat_elems_;
    acc_t* t = tables_.get() + (kvh * n_blocks_ + global_block) * table_elems_;
    return {m, m + Dk_ * Bk_, t, t + rep_ * Bk_};
  }

  // Global index of the block holding key j0 of sequence b.
  int64_t block_of(int64_t b, int64_t j0) const { return block_base_[b] + j0 / Bk_; }

  // Rows of kt (the GEMM's reduction length for the scores).
  int64_t key_rows() const { return Dk_; }

 private:
  int64_t D_ = 0, Dk_ = 0, Dv_ = 0, Bk_ = 0, rep_ = 0, mat_elems_ = 0, table_elems_ = 0, n_blocks_ = 0;
  std::vector<int64_t> block_base_;
  std::unique_ptr<mat_t[]> mats_;
  std::unique_ptr<acc_t[]> tables_;
};

}  // namespace avar::cpu
