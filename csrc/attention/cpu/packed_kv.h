// K and V of every (kv head, key block), converted to the accumulator type once and laid out the way the
// GEMMs read them, so that the query-block tasks (which each sweep many key blocks) neither transpose nor
// convert anything in their inner loop. Memory is linear in Lk.
#pragma once

#include <memory>

#include "common.h"

namespace avar::cpu {

template <typename scalar_t>
class PackedKV {
 public:
  using acc_t = typename AccType<scalar_t>::type;

  // One tile: kt [D, Bk] (K transposed) | vext [Bk, D + G] (V and one-hot group columns) |
  //           gamma [rep, Bk] | beta [rep, Bk] (per-column logit scale and bias of each stacked head).
  struct Tile {
    acc_t* kt;
    acc_t* vext;
    acc_t* gamma;
    acc_t* beta;
  };

  PackedKV(const AttnFwdParams& p, int64_t key_block) {
    const SeqLayout& s = p.seq;
    D_ = s.head_dim;
    Dv_ = D_ + kNumGroups;
    Bk_ = key_block;
    rep_ = s.heads / s.kv_heads;
    tile_elems_ = D_ * Bk_ + Bk_ * Dv_ + 2 * rep_ * Bk_;
    block_base_.resize(s.batch + 1, 0);
    for (int64_t b = 0; b < s.batch; ++b) {
      const int64_t len_k = seq_bounds(s, b).len_k;
      block_base_[b + 1] = block_base_[b] + (len_k + Bk_ - 1) / Bk_;
    }
    n_blocks_ = block_base_[s.batch];
    data_.reset(new acc_t[static_cast<size_t>(s.kv_heads * n_blocks_ * tile_elems_)]);  // every tile fills itself

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
        std::fill(tl.kt, tl.kt + tile_elems_, acc_t(0));
        for (int64_t c = 0; c < nk; ++c) {
          const int64_t row = sb.k_start + j0 + c;
          const scalar_t* kp = row_ptr(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, row, kvh);
          const scalar_t* vp = row_ptr(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, row, kvh);
          for (int64_t d = 0; d < D_; ++d) tl.kt[d * Bk_ + c] = static_cast<acc_t>(kp[d]);
          acc_t* ve = tl.vext + c * Dv_;
          load_row(vp, ve, D_, acc_t(1));
          const int g = key_group_of(p, b, row);
          grp[c] = static_cast<int8_t>(g);
          if (g >= 0) ve[D_ + g] = acc_t(1);
        }
        for (int64_t hh = 0; hh < rep_; ++hh)
          fill_group_columns(p, nk, kvh * rep_ + hh, grp.data(), tl.gamma + hh * Bk_, tl.beta + hh * Bk_);
      }
    });
  }

  Tile tile(int64_t kvh, int64_t global_block) {
    acc_t* base = data_.get() + (kvh * n_blocks_ + global_block) * tile_elems_;
    return {base, base + D_ * Bk_, base + D_ * Bk_ + Bk_ * Dv_, base + D_ * Bk_ + Bk_ * Dv_ + rep_ * Bk_};
  }

  // Global index of the block holding key j0 of sequence b.
  int64_t block_of(int64_t b, int64_t j0) const { return block_base_[b] + j0 / Bk_; }

 private:
  int64_t D_ = 0, Dv_ = 0, Bk_ = 0, rep_ = 0, tile_elems_ = 0, n_blocks_ = 0;
  std::vector<int64_t> block_base_;
  std::unique_ptr<acc_t[]> data_;
};

}  // namespace avar::cpu
