// CPU decode: the forward for a few query tokens per sequence (Lq ≤ kDecodeMaxQueries) against a KV cache.
//
// A decode step is memory-bound: its floor is reading the cache once. The tiled forward packs all of K and V
// before it starts (a second copy of the cache, written and read again), which a prefill amortises over many
// query blocks but a decode step does not. Here K and V are read where they lie, once per kv head: one task =
// (sequence, kv head, range of keys), and the rep = H / H_kv query heads of the GQA group times the Lq queries
// are the rows that every loaded key and value serve. Scores are dot products of several rows with several keys
// per pass (decode_dot.h: no transposed copy of K, bf16 keys through the bf16 dot product where the CPU has it,
// widened to fp32 otherwise); P·V broadcasts p over rows of V held in registers, in fp32, or with bf16 V where the
// bf16 dot product runs, two keys per bf16 dot-product instruction with p rounded to bf16 for P·V only (as GPU
// kernels do: the normaliser, the lse and the masses keep the fp32 sums). K is prefetched into L2 16 KB of rows
// ahead and V a chunk ahead (decode_dot.h: the hardware prefetcher alone left the core waiting on memory).
//
// When B · H_kv tasks are too few to keep every thread busy, the keys are split into ranges (split-K): each task
// leaves its unnormalised (max, group sums, out) per row in a scratch buffer, and the task that finishes the last
// range of a (sequence, kv head) merges its ranges by their maxima, as the CUDA decode does, within the same
// parallel region. A call whose cache is small runs on the calling thread alone. Masked keys (group −1) never
// enter: not their K (their score is set to −inf whatever the product with their K gave) and not their V (skipped
// in P·V, or loaded as zeros).
#include <ATen/cpu/vec/functional.h>

#include <memory>

#include "cpu_kernels.h"
#include "decode_dot.h"
#include "row_ops.h"

namespace avar::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();
// Keys per step: 16 KB of K as the scores read it (fp32, or bf16 widened to fp32: 32 keys at D = 128; bf16 through
// the bf16 dot product: 64) and as much V, in L1 while the step works on them. 64 bf16 keys halve what each key pays
// of the step's fixed work (the softmax's max and rescale, loop overheads): about 10% faster at B = 8, 16k than 32,
// measured in turns in one process; fp32 gains nothing from 64.
constexpr int64_t kChunkWide = 32, kChunkBf16Dot = 64;
constexpr int64_t kRowTile = W >= 16 ? 8 : 4;  // rows per register tile: 2 accumulators each (AVX2 has 16 registers)
constexpr int64_t kMinSplitKeys = 512;         // a key range shorter than this costs more to merge than it saves

// acc[r] += Σ_c p[r · ldp + c] · v[c] over the live keys, for R rows of acc ([R, D], row stride ldacc). Slices of
// 2W columns keep R × 2 accumulators in registers while the chunk's V rows stream from L1. Each (slice, key) step
// prefetches the same slice of the next chunk's key (v_next, n_next keys of it), so V arrives a chunk ahead.
template <int R, typename scalar_t>
void accumulate_pv(float* acc, int64_t ldacc, const float* p, int64_t ldp, const scalar_t* v, int64_t ldv,
                   const int8_t* live, int64_t nk, int64_t D, const scalar_t* v_next, int64_t n_next) {
  for (int64_t d = 0; d < D; d += 2 * W) {
    const int64_t n = std::min<int64_t>(2 * W, D - d);
    Vec lo[R], hi[R];
    AVAR_UNROLL
    for (int r = 0; r < R; ++r) load_pair(acc + r * ldacc + d, n, lo[r], hi[r]);
    for (int64_t c = 0; c < nk; ++c) {
      if (c < n_next) prefetch_l2(v_next + c * ldv + d, n * static_cast<int64_t>(sizeof(scalar_t)));
      if (!live[c]) continue;
      Vec vlo, vhi;
      load_pair(v + c * ldv + d, n, vlo, vhi);
      AVAR_UNROLL
      for (int r = 0; r < R; ++r) {
        const Vec pc(p[r * ldp + c]);
        lo[r] = at::vec::fmadd(pc, vlo, lo[r]);
        hi[r] = at::vec::fmadd(pc, vhi, hi[r]);
      }
    }
    AVAR_UNROLL
    for (int r = 0; r < R; ++r) store_pair(lo[r], hi[r], n, acc + r * ldacc + d);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// The bf16 P·V of bf16_dot: acc[r] += Σ_c p[r, c] · v[c] with p rounded to bf16 (as GPU kernels and PyTorch's own
// bf16 attention round P before P·V; the row's normaliser stays the sum of the unrounded p) and exact products summed
// in fp32 by _mm512_dpbf16_ps, two keys per instruction: half the multiply-adds of the widening kernel above, and no
// widening of V. pp[r · ldpp + c / 2] holds the bf16 pair (p[r, c], p[r, c + 1]); the V rows of a pair are
// interleaved in registers ([v_c[d], v_c+1[d]] per fp32 lane). Masked keys' V (which may hold anything) and keys past
// nk load as zeros.
template <int R>
__attribute__((target("avx512bf16"))) void accumulate_pv_bf16(float* acc, int64_t ldacc, const uint32_t* pp,
                                                              int64_t ldpp, const at::BFloat16* v, int64_t ldv,
                                                              const int8_t* live, int64_t nk, int64_t D,
                                                              const at::BFloat16* v_next, int64_t n_next) {
  // Lanes 2i and 2i + 1 of the interleaved vector take element i of a and of b; lo: i < 16, hi: i ≥ 16.
  alignas(64) static constexpr int16_t kLo[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr int16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo_idx = _mm512_load_si512(kLo), hi_idx = _mm512_load_si512(kHi);
  for (int64_t d = 0; d < D; d += 2 * W) {
    const int64_t n = std::min<int64_t>(2 * W, D - d);
    const __mmask32 cols = static_cast<__mmask32>((uint64_t{1} << n) - 1);
    Vec lo[R], hi[R];
    AVAR_UNROLL
    for (int r = 0; r < R; ++r) load_pair(acc + r * ldacc + d, n, lo[r], hi[r]);
    for (int64_t c = 0; c < nk; c += 2) {
      if (c < n_next) prefetch_l2(v_next + c * ldv + d, n * static_cast<int64_t>(sizeof(at::BFloat16)));
      if (c + 1 < n_next) prefetch_l2(v_next + (c + 1) * ldv + d, n * static_cast<int64_t>(sizeof(at::BFloat16)));
      const bool live0 = live[c], live1 = c + 1 < nk && live[c + 1];
      if (!live0 && !live1) continue;
      const __m512i va = _mm512_maskz_loadu_epi16(live0 ? cols : 0, v + c * ldv + d);
      const __m512i vb = _mm512_maskz_loadu_epi16(live1 ? cols : 0, v + (c + 1) * ldv + d);
      const __m512i vlo = _mm512_permutex2var_epi16(va, lo_idx, vb);
      const __m512i vhi = _mm512_permutex2var_epi16(va, hi_idx, vb);
      AVAR_UNROLL
      for (int r = 0; r < R; ++r) {
        const __m512i pr = _mm512_set1_epi32(static_cast<int>(pp[r * ldpp + c / 2]));
        lo[r] = _mm512_dpbf16_ps(lo[r], (__m512bh)pr, (__m512bh)vlo);
        hi[r] = _mm512_dpbf16_ps(hi[r], (__m512bh)pr, (__m512bh)vhi);
      }
    }
    AVAR_UNROLL
    for (int r = 0; r < R; ++r) store_pair(lo[r], hi[r], n, acc + r * ldacc + d);
  }
}

// p ([rows, n] fp32, row stride ldp, n a multiple of 2W) rounded to bf16 pairs for accumulate_pv_bf16.
__attribute__((target("avx512bf16"))) inline void round_p_pairs(const float* p, int64_t ldp, int64_t rows, int64_t n,
                                                                uint32_t* pp, int64_t ldpp) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; c += 2 * W) {
      const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + r * ldp + c + W), _mm512_loadu_ps(p + r * ldp + c));
      _mm512_storeu_si512(pp + r * ldpp + c / 2, (__m512i)b);
    }
}

template <int R>
struct AccumulatePVBf16 {
  static void run(int64_t r0, float* acc, int64_t ldacc, const uint32_t* pp, int64_t ldpp, const at::BFloat16* v,
                  int64_t ldv, const int8_t* live, int64_t nk, int64_t D, const at::BFloat16* v_next, int64_t n_next) {
    accumulate_pv_bf16<R>(acc + r0 * ldacc, ldacc, pp + r0 * ldpp, ldpp, v, ldv, live, nk, D, v_next,
                          r0 == 0 ? n_next : 0);
  }
};
#endif

// The micro-kernels for any row count, in register tiles of kRowTile rows.
template <template <int> class Kernel, typename... Args>
void for_row_tiles(int64_t rows, Args... args) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
    switch (std::min(kRowTile, rows - r0)) {
      case 1:
        Kernel<1>::run(r0, args...);
        break;
      case 2:
        Kernel<2>::run(r0, args...);
        break;
      case 3:
        Kernel<3>::run(r0, args...);
        break;
      case 4:
        Kernel<4>::run(r0, args...);
        break;
      case 5:
        Kernel<std::min<int>(5, kRowTile)>::run(r0, args...);
        break;
      case 6:
        Kernel<std::min<int>(6, kRowTile)>::run(r0, args...);
        break;
      case 7:
        Kernel<std::min<int>(7, kRowTile)>::run(r0, args...);
        break;
      default:
        Kernel<kRowTile>::run(r0, args...);
        break;
    }
  }
}

template <int R>
struct AccumulatePV {
  template <typename scalar_t>
  static void run(int64_t r0, float* acc, int64_t ldacc, const float* p, int64_t ldp, const scalar_t* v, int64_t ldv,
                  const int8_t* live, int64_t nk, int64_t D, const scalar_t* v_next, int64_t n_next) {
    accumulate_pv<R>(acc + r0 * ldacc, ldacc, p + r0 * ldp, ldp, v, ldv, live, nk, D, v_next, r0 == 0 ? n_next : 0);
  }
};

struct DecodeTask {
  int64_t b, kvh, k0, k1;  // keys [k0, k1) of sequence b, kv head kvh
  int64_t part;            // index of its partial-result slot
  int64_t pair;            // index of its (sequence, kv head)
};

// Per row of a task, the running state, stored [max | group sums (G) | out (D)]: one row of the scratch buffer.
struct RowState {
  static constexpr int64_t kMax = 0, kSums = 1;
  static int64_t width(int64_t D) { return 1 + kNumGroups + D; }
  static int64_t out_offset() { return 1 + kNumGroups; }
};

template <typename scalar_t>
void write_row(const AttnFwdParams& p, int64_t b, int64_t row, int64_t h, bool alive, float m, const float* sums,
               const float* acc) {
  const int64_t D = p.seq.head_dim;
  scalar_t* o = row_ptr(static_cast<scalar_t*>(p.out), p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, row, h);
  float* ms = p.mass == nullptr
                  ? nullptr
                  : row_ptr(p.mass, p.mass_batch_stride, p.mass_row_stride, p.mass_head_stride, b, row, h);
  float& lse = p.lse[b * p.lse_batch_stride + row * p.lse_row_stride + h * p.lse_head_stride];
  if (!alive) {  // no visible key: out 0, lse −inf, mass 0
    std::fill(o, o + D, scalar_t(0));
    lse = -std::numeric_limits<float>::infinity();
    if (ms != nullptr) std::fill(ms, ms + kNumGroups, 0.f);
    return;
  }
  // A row that sees keys but whose max is not finite (a NaN score, a score overflowed to +inf, every score −inf)
  // is NaN throughout, as softmax itself would give; it must never pass for a dead row.
  const bool finite = std::isfinite(m);
  float l = 0.f;
  for (int g = 0; g < kNumGroups; ++g) l += sums[g];
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inv = finite ? 1.f / l : nan;
  store_row(acc, o, D, inv);
  lse = finite ? m + std::log(l) : nan;
  if (ms != nullptr)
    for (int g = 0; g < kNumGroups; ++g) ms[g] = sums[g] * inv;
}

// Below this many bytes of K and V a call runs on the calling thread alone: waking a second thread costs more than
// it saves, and on a busy machine the call then waits for whichever thread is descheduled.
constexpr int64_t kMinParallelBytes = int64_t{1} << 20;

template <typename scalar_t, int64_t kChunk>
void decode_impl(const AttnFwdParams& p) {
  static_assert(kChunk % (2 * W) == 0, "the key chunk must be whole pairs of vectors");
  const SeqLayout& s = p.seq;
  const int64_t rep = s.heads / s.kv_heads, D = s.head_dim, G = kNumGroups;
  const int64_t RW = RowState::width(D);
  const std::vector<int64_t> first_live = first_live_keys(p);  // [B]
  // bf16 keys: through the bf16 dot product (q kept in bf16, the softmax scale moved into γ), or widened to fp32.
  constexpr bool is_bf16 = std::is_same_v<scalar_t, at::BFloat16>;
  const bool bf16_dot = is_bf16 && bf16_dot_available();
  TORCH_CHECK(kChunk == (bf16_dot ? kChunkBf16Dot : kChunkWide), "avar: decode chunk of ", kChunk, " keys");
  const int64_t Dq = (D + kBf16DotAlign - 1) / kBf16DotAlign * kBf16DotAlign;  // bf16 q rows, zero-padded

  int64_t max_rows = 0, live_pairs = 0, kv_bytes = 0;
  std::vector<int64_t> kv_end(s.batch), splits(s.batch, 0);
  for (int64_t b = 0; b < s.batch; ++b) {
    const SeqBounds sb = seq_bounds(s, b);
    kv_end[b] = sb.len_q > 0 ? visible_end(s, sb, sb.len_q - 1) : 0;
    max_rows = std::max(max_rows, rep * sb.len_q);
    if (sb.len_q > 0) live_pairs += s.kv_heads;
    kv_bytes += 2 * kv_end[b] * s.kv_heads * D * static_cast<int64_t>(sizeof(scalar_t));
  }
  const bool one_thread = kv_bytes < kMinParallelBytes;
  const int64_t threads = one_thread ? 1 : at::get_num_threads();
  // Key ranges: enough tasks for the threads to share (dynamic claiming evens out the rest), none shorter than
  // kMinSplitKeys. The ranges of one (sequence, kv head) are consecutive tasks and partial slots.
  const int64_t wanted = (4 * threads + std::max<int64_t>(live_pairs, 1) - 1) / std::max<int64_t>(live_pairs, 1);
  std::vector<DecodeTask> tasks;
  std::vector<int64_t> first_task;  // [pairs]  first task of each (sequence, kv head): its ranges follow it
  int64_t n_parts = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    if (seq_bounds(s, b).len_q == 0) continue;
    const int64_t by_len = std::max<int64_t>(1, kv_end[b] / kMinSplitKeys);
    splits[b] = one_thread ? 1 : std::min(wanted, by_len);
    // Range bounds on chunk multiples.
    const int64_t chunks = (kv_end[b] + kChunk - 1) / kChunk;
    for (int64_t kvh = 0; kvh < s.kv_heads; ++kvh) {
      first_task.push_back(static_cast<int64_t>(tasks.size()));
      for (int64_t sp = 0; sp < splits[b]; ++sp) {
        const int64_t k0 = std::min(kv_end[b], (chunks * sp / splits[b]) * kChunk);
        const int64_t k1 = std::min(kv_end[b], (chunks * (sp + 1) / splits[b]) * kChunk);
        tasks.push_back({b, kvh, k0, k1, n_parts++, static_cast<int64_t>(first_task.size()) - 1});
      }
    }
  }
  if (tasks.empty()) return;
  // Longest ranges first, so that dynamic claiming balances the threads.
  std::vector<int64_t> order(tasks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t c) { return tasks[a].k1 - tasks[a].k0 > tasks[c].k1 - tasks[c].k0; });
  std::vector<float> parts(static_cast<size_t>(n_parts * max_rows * RW));  // [parts, rows, RW]
  // Ranges of each pair still running: the task that finishes a pair's last range merges the pair's ranges, in the
  // same parallel region.
  std::unique_ptr<std::atomic<int64_t>[]> pending(new std::atomic<int64_t>[first_task.size()]);
  for (size_t i = 0; i < first_task.size(); ++i) pending[i].store(splits[tasks[first_task[i]].b]);

  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);

  auto per_thread = [&](const auto& claim) {
    std::vector<float> qs(bf16_dot ? 0 : max_rows * D);            // [rows, D]  q · scale
    std::vector<at::BFloat16> qb(bf16_dot ? max_rows * Dq : 0);    // [rows, Dq]  q as given, zeros past D
    std::vector<float> kw(is_bf16 && !bf16_dot ? kChunk * D : 0);  // [kChunk, D]  the chunk's keys widened
    std::vector<float> gam(max_rows * G), bet(max_rows * G);       // [rows, G]  logit scale and bias of each row's head
    std::vector<int8_t> uniform(max_rows);                         // [rows]  the same γ and β for every group
    std::vector<int64_t> vis_end(max_rows);                        // [rows]  keys [0, vis_end) visible
    std::vector<float> sbuf(max_rows * kChunk);                    // [rows, kChunk]  scores, then p
    std::vector<uint32_t> pairs(bf16_dot ? max_rows * kChunk / 2 : 0);  // [rows, kChunk / 2]  bf16 pairs of p
    std::vector<Vec> vsums(max_rows * G);  // [rows, G]  per-lane group sums, reduced at the end
    std::vector<float> merged(RW);
    alignas(64) float is_group[kNumGroups][kChunk];  // all-ones bits where the key is in group g
    alignas(64) float is_live[kChunk];               // all-ones bits where the key is live (group ≥ 0)
    int8_t live[kChunk];

    for (int64_t t = claim(); t >= 0; t = claim()) {
      const DecodeTask& task = tasks[order[t]];
      const int64_t b = task.b, kvh = task.kvh;
      const SeqBounds sb = seq_bounds(s, b);
      const int64_t nq = sb.len_q, rows = rep * nq;  // row r = hh · nq + qi, head h = kvh · rep + hh
      float* st = parts.data() + task.part * max_rows * RW;

      for (int64_t hh = 0; hh < rep; ++hh) {
        const int64_t h = kvh * rep + hh;
        for (int64_t qi = 0; qi < nq; ++qi) {
          const int64_t r = hh * nq + qi;
          const scalar_t* qr = row_ptr(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, sb.q_start + qi, h);
          if (bf16_dot) {
            if constexpr (is_bf16) {
              std::copy(qr, qr + D, qb.data() + r * Dq);
              std::fill(qb.data() + r * Dq + D, qb.data() + (r + 1) * Dq, at::BFloat16(0.f));
            }
          } else {
            load_row(qr, qs.data() + r * D, D, static_cast<float>(s.scale));
          }
          const float gamma_mul = bf16_dot ? static_cast<float>(s.scale) : 1.f;
          bool same = true;
          for (int64_t g = 0; g < G; ++g) {
            gam[r * G + g] = p.logit_scale[h * G + g] * gamma_mul;
            bet[r * G + g] = p.bias[h * G + g];
            same = same && gam[r * G + g] == gam[r * G] && bet[r * G + g] == bet[r * G];
          }
          uniform[r] = same;
          vis_end[r] = visible_end(s, sb, qi);
          float* sr = st + r * RW;
          sr[RowState::kMax] = neg_inf<float>();
          std::fill(sr + RowState::kSums, sr + RW, 0.f);
          for (int64_t g = 0; g < G; ++g) vsums[r * G + g] = Vec(0.f);
        }
      }

      for (int64_t j0 = task.k0; j0 < task.k1; j0 += kChunk) {
        const int64_t nk = std::min(kChunk, task.k1 - j0);
        int64_t n_live = 0;
        alignas(64) float grp[kChunk];  // group of each key (−1: masked, or past the range)
        for (int64_t c = 0; c < kChunk; ++c) {
          const int g = c < nk ? key_group_of(p, b, sb.k_start + j0 + c) : -1;
          grp[c] = static_cast<float>(g);
          live[c] = g >= 0;
          n_live += g >= 0;
        }
        if (n_live == 0) continue;  // p = 0 for every row: nothing to add, nothing to rescale
        for (int64_t c = 0; c < kChunk; c += W) {
          const Vec gv = Vec::loadu(grp + c);
          for (int g = 0; g < G; ++g) (gv == Vec(static_cast<float>(g))).store(is_group[g] + c);
          (gv >= Vec(0.f)).store(is_live + c);
        }

        const scalar_t* kr = row_ptr(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, sb.k_start + j0, kvh);
        const scalar_t* vr = row_ptr(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, sb.k_start + j0, kvh);
        const RowPrefetch pf = rows_ahead(kr, p.k_row_stride, task.k1 - j0, D);
        if constexpr (is_bf16) {
          if (bf16_dot) {
            dot_all_rows(rows, qb.data(), Dq, kr, p.k_row_stride, nk, D, sbuf.data(), kChunk, pf);
          } else {
            widen_rows(kr, p.k_row_stride, nk, D, kw.data());
            dot_all_rows(rows, qs.data(), D, kw.data(), D, nk, D, sbuf.data(), kChunk, pf);
          }
        } else {
          dot_all_rows(rows, qs.data(), D, kr, p.k_row_stride, nk, D, sbuf.data(), kChunk, pf);
        }

        for (int64_t r = 0; r < rows; ++r) {
          float* sr = sbuf.data() + r * kChunk;
          float* state = st + r * RW;
          const int64_t n_vis = std::clamp<int64_t>(vis_end[r] - j0, 0, nk);
          // s = raw · γ[h, g] + β[h, g] for live visible keys, −inf for the rest (their raw score is not used: a
          // masked key's K may hold anything).
          const float* gr = gam.data() + r * G;
          const float* br = bet.data() + r * G;
          Vec vmax(neg_inf<float>());
          for (int64_t c = 0; c < kChunk; c += W) {
            Vec gm(gr[0]), bt(br[0]);
            if (!uniform[r])
              for (int g = 1; g < G; ++g) {
                const Vec in_g = Vec::loadu(is_group[g] + c);
                gm = Vec::blendv(gm, Vec(gr[g]), in_g);
                bt = Vec::blendv(bt, Vec(br[g]), in_g);
              }
            const Vec x = at::vec::fmadd(Vec::loadu(sr + c), gm, bt);
            Vec::blendv(Vec(neg_inf<float>()), x, Vec::loadu(is_live + c)).store(sr + c);
          }
          for (int64_t c = n_vis; c < kChunk; ++c) sr[c] = neg_inf<float>();  // causally hidden, or past the range
          for (int64_t c = 0; c < kChunk; c += W) vmax = at::vec::maximum(vmax, Vec::loadu(sr + c));  // keeps NaN
          const float tile_max =
              at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, vmax);
          const float m_old = state[RowState::kMax];
          const float m_new = max_nan(m_old, tile_max);
          if (m_new == neg_inf<float>()) {  // nothing visible yet
            std::fill(sr, sr + kChunk, 0.f);
            continue;
          }
          Vec* vs = vsums.data() + r * G;
          if (m_old != m_new) {
            const float alpha = std::exp(m_old - m_new);  // 0 while m_old = −inf
            scale_row(state + RowState::out_offset(), alpha, D);
            for (int g = 0; g < G; ++g) vs[g] = vs[g] * Vec(alpha);
            state[RowState::kMax] = m_new;
          }
          // p = exp(s − m), and its sum per group (lane-wise; masked keys have p = 0).
          const Vec vm(m_new);
          for (int64_t c = 0; c < kChunk; c += W) {
            const Vec e = fast_exp<float>(Vec::loadu(sr + c) - vm);
            e.store(sr + c);
            for (int g = 0; g < G; ++g) vs[g] = vs[g] + (e & Vec::loadu(is_group[g] + c));
          }
        }
        const scalar_t* v_next = vr + kChunk * p.v_row_stride;  // the next chunk's V, prefetched during this P·V
        const int64_t n_next = std::clamp<int64_t>(task.k1 - j0 - kChunk, 0, kChunk);
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (is_bf16) {
          if (bf16_dot) {
            round_p_pairs(sbuf.data(), kChunk, rows, kChunk, pairs.data(), kChunk / 2);
            for_row_tiles<AccumulatePVBf16>(rows, st + RowState::out_offset(), RW, pairs.data(), kChunk / 2, vr,
                                            p.v_row_stride, live, nk, D, v_next, n_next);
            continue;
          }
        }
#endif
        for_row_tiles<AccumulatePV>(rows, st + RowState::out_offset(), RW, sbuf.data(), kChunk, vr, p.v_row_stride,
                                    live, nk, D, v_next, n_next);
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int g = 0; g < G; ++g)
          st[r * RW + RowState::kSums + g] =
              at::vec::vec_reduce_all<float>([](const Vec& x, const Vec& y) { return x + y; }, vsums[r * G + g]);

      if (splits[b] == 1) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t hh = r / nq, qi = r % nq;
          const float* sr = st + r * RW;
          write_row<scalar_t>(p, b, sb.q_start + qi, kvh * rep + hh, vis_end[r] > first_live[b], sr[RowState::kMax],
                              sr + RowState::kSums, sr + RowState::out_offset());
        }
        continue;
      }
      // The last range of its pair to finish merges them: every range's sums rescaled to the common max. The
      // acquire-release count makes the other ranges' partial results visible here.
      if (pending[task.pair].fetch_sub(1, std::memory_order_acq_rel) != 1) continue;
      const DecodeTask& t0 = tasks[first_task[task.pair]];
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t hh = r / nq, qi = r % nq;
        float m = neg_inf<float>();
        for (int64_t sp = 0; sp < splits[b]; ++sp) m = max_nan(m, parts[((t0.part + sp) * max_rows + r) * RW]);
        std::fill(merged.begin(), merged.end(), 0.f);
        if (std::isfinite(m)) {
          for (int64_t sp = 0; sp < splits[b]; ++sp) {
            const float* sr = parts.data() + ((t0.part + sp) * max_rows + r) * RW;
            if (sr[RowState::kMax] == neg_inf<float>()) continue;  // the range showed this row no key
            const float w = std::exp(sr[RowState::kMax] - m);
            for (int64_t i = 1; i < RW; ++i) merged[i] += w * sr[i];
          }
        }
        write_row<scalar_t>(p, b, sb.q_start + qi, kvh * rep + hh, vis_end[r] > first_live[b], m,
                            merged.data() + RowState::kSums, merged.data() + RowState::out_offset());
      }
    }
  };
  if (one_thread) {
    int64_t next = 0;
    const int64_t n = static_cast<int64_t>(tasks.size());
    per_thread([&]() -> int64_t { return next < n ? next++ : -1; });
  } else {
    parallel_tasks(static_cast<int64_t>(tasks.size()), per_thread, /*uses_gemm=*/false);
  }
}

}  // namespace

bool decode_applies(const AttnFwdParams& p, at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16) return false;
  // Benchmark switch: AVAR_CPU_DECODE=0 sends decode shapes through the tiled forward, so that one run can time both.
  const char* env = std::getenv("AVAR_CPU_DECODE");
  if (env != nullptr && env[0] == '0' && env[1] == '\0') return false;
  const SeqLayout& s = p.seq;
  for (int64_t b = 0; b < s.batch; ++b)
    if (seq_bounds(s, b).len_q > kDecodeMaxQueries) return false;
  return true;
}

void attention_fwd_decode(const AttnFwdParams& p, at::ScalarType dtype) {
  if (dtype == at::kFloat) return decode_impl<float, kChunkWide>(p);
  TORCH_CHECK(dtype == at::kBFloat16, "avar: the CPU decode has no kernel for dtype ", dtype);
  if (bf16_dot_available()) return decode_impl<at::BFloat16, kChunkBf16Dot>(p);
  decode_impl<at::BFloat16, kChunkWide>(p);
}

}  // namespace avar::cpu
