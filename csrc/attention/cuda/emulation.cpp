// The fiber scheduler and the warp instructions of the emulated CUDA device (emulation.h).
#include "emulation.h"

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// Switching fibers is most of the emulation's time: on x86-64 a switch saves the callee-saved registers on the
// old stack and restores them from the new one (ucontext would add a system call per switch to save the signal
// mask). The SSE and x87 control words are left alone: nothing here changes them, and saving them costs more
// than the rest of the switch. Other architectures use ucontext.
#if defined(__x86_64__)
extern "C" void avar_emulation_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl avar_emulation_switch
  .hidden avar_emulation_switch
  .type avar_emulation_switch, @function
avar_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size avar_emulation_switch, .-avar_emulation_switch
)");
#endif

namespace avar::cuda_emulation {
namespace {

constexpr size_t kStackBytes = 256 * 1024;    // per CUDA thread; unoptimised builds keep every array on it
constexpr size_t kMaxSmemBytes = 163 * 1024;  // sm_80's opt-in limit per CTA, the smallest of the target archs
constexpr int kMaxThreads = 1024;

struct PendingCopy {
  unsigned char* dst;
  const unsigned char* src;  // null: zero fill
  int group;
};

// A suspended execution context: a saved stack pointer (x86-64) or a ucontext.
struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

void switch_context(Context& save, Context& load) {
#if defined(__x86_64__)
  avar_emulation_switch(&save.sp, load.sp);
#else
  swapcontext(&save.uc, &load.uc);
#endif
}

struct Fiber {
  Context ctx;
  std::unique_ptr<unsigned char[]> stack;
  uint3 tid;
  int linear = 0;
  bool done = false;
  const uint64_t* wait_on = nullptr;  // blocked while *wait_on == wait_value
  uint64_t wait_value = 0;
  std::vector<PendingCopy> copies;  // cp.async issued and not yet waited for
  int open_group = 0;               // cp.async groups committed so far
};

struct Warp {
  uint64_t generation = 0;
  int arrived = 0;
  WarpOp op = WarpOp::kShflXor;
  uint32_t in[32][kMaxIn];
  uint32_t out[32][kMaxOut];
};

struct Cta {
  dim3 grid, block;
  uint3 index;
  int threads = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Fiber>* fibers = nullptr;
  std::vector<Warp> warps;
  uint64_t barrier_generation = 0;
  int barrier_arrived = 0;
  Context scheduler;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  bool failed = false;
};

// Read on every emulated instruction: initial-exec TLS avoids a __tls_get_addr call per read.
__attribute__((tls_model("initial-exec"))) thread_local Cta* t_cta = nullptr;
thread_local std::string t_error;

Cta& cta() {
  return *t_cta;
}

void fail(const std::string& what) {
  cta().failed = true;
  if (t_error.empty()) {
    const Cta& c = cta();
    t_error = what + " (block (" + std::to_string(c.index.x) + ", " + std::to_string(c.index.y) + ", " +
              std::to_string(c.index.z) + "), thread " + std::to_string(c.current ? c.current->linear : -1) + ")";
  }
}

// Suspends the current fiber until *generation moves past `seen`.
void wait_for(const uint64_t* generation, uint64_t seen) {
  Fiber* f = cta().current;
  f->wait_on = generation;
  f->wait_value = seen;
  switch_context(f->ctx, cta().scheduler);
}

// Every fiber starts here and never returns: when its thread of the kernel is done it hands control back to the
// scheduler for good.
void fiber_main() {
  Cta& c = cta();
  (*c.body)();
  c.current->done = true;
  switch_context(c.current->ctx, c.scheduler);
  std::abort();  // a finished fiber is never resumed
}

void start_fiber(Fiber& f) {
#if defined(__x86_64__)
  // The frame avar_emulation_switch pops: r15, r14, r13, r12, rbx, rbp, then the return address fiber_main, at
  // a 16-byte boundary so that fiber_main starts as if called.
  // Stack tops at one offset modulo 4 KB would all fall in the same cache sets; stagger them.
  const size_t stagger = (static_cast<size_t>(f.linear) * 448) % 16384;
  auto top = reinterpret_cast<uintptr_t>(f.stack.get() + kStackBytes - stagger) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<uint64_t*>(top - 32);
  slot[0] = reinterpret_cast<uint64_t>(&fiber_main);
  uint64_t* frame = slot - 6;
  for (int i = 0; i < 6; ++i) frame[i] = 0;
  f.ctx.sp = frame;
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = f.stack.get();
  f.ctx.uc.uc_stack.ss_size = kStackBytes;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, fiber_main, 0);
#endif
}

bool in_smem(uint32_t offset, uint32_t bytes) {
  return static_cast<size_t>(offset) + bytes <= cta().smem_bytes;
}

float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

template <WarpOp kOp>
float half_bits_to_float(uint16_t bits) {
  if constexpr (kOp == WarpOp::kMmaBf16) {
    return bits_to_float(static_cast<uint32_t>(bits) << 16);
  } else {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  }
}

uint16_t lo16(uint32_t w) {
  return static_cast<uint16_t>(w & 0xFFFFu);
}
uint16_t hi16(uint32_t w) {
  return static_cast<uint16_t>(w >> 16);
}

// Fragment layouts of mma.sync.m16n8k16 (PTX ISA), lane = 4·group + t:
//   A (16×16): reg r holds row group + 8·(r & 1), columns 2t + 8·(r >> 1) and the next one (low half first)
//   B (16×8):  reg r holds rows 2t + 8·r and the next one, column group
//   C, D (16×8, fp32): element e is row group + 8·(e >> 1), column 2t + (e & 1)
// Products of two 16-bit floats are exact in fp32; the sums are rounded in fp32, as on the tensor cores (whose
// order of summation is not specified).
template <WarpOp kOp>
void mma(Warp& w) {
  float a[16][16], bt[8][16], d[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, t = lane & 3;
    for (int r = 0; r < 4; ++r) {
      const int row = group + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
      a[row][col] = half_bits_to_float<kOp>(lo16(w.in[lane][r]));
      a[row][col + 1] = half_bits_to_float<kOp>(hi16(w.in[lane][r]));
    }
    for (int r = 0; r < 2; ++r) {
      const int k = 2 * t + 8 * r;
      bt[group][k] = half_bits_to_float<kOp>(lo16(w.in[lane][4 + r]));
      bt[group][k + 1] = half_bits_to_float<kOp>(hi16(w.in[lane][4 + r]));
    }
    for (int e = 0; e < 4; ++e) d[group + 8 * (e >> 1)][2 * t + (e & 1)] = bits_to_float(w.in[lane][6 + e]);
  }
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 8; ++j) {
      float acc = 0.f;
      for (int k = 0; k < 16; ++k) acc += a[i][k] * bt[j][k];
      d[i][j] += acc;
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; ++e) w.out[lane][e] = float_to_bits(d[group + 8 * (e >> 1)][2 * t + (e & 1)]);
  }
}

// ldmatrix.sync.aligned.m8n8.x4 (.trans): lanes 8m..8m+7 give the addresses of rows 0..7 of matrix m; lane l
// receives, in register m, row l/4 columns 2(l%4), 2(l%4)+1 of matrix m (of its transpose with .trans).
void ldmatrix(Warp& w, bool trans) {
  for (int lane = 0; lane < 32; ++lane) {
    const uint32_t addr = w.in[lane][0];
    if (addr % 16 != 0 || !in_smem(addr, 16)) {
      fail("ldmatrix: lane " + std::to_string(lane) + " gave shared address " + std::to_string(addr) +
           ", which is not a 16-byte aligned row inside the CTA's " + std::to_string(cta().smem_bytes) + " bytes");
      return;
    }
  }
  const auto elem = [&](int lane_of_row, int col) {
    uint16_t v;
    std::memcpy(&v, cta().smem + w.in[lane_of_row][0] + 2 * col, 2);
    return static_cast<uint32_t>(v);
  };
  for (int lane = 0; lane < 32; ++lane) {
    for (int m = 0; m < 4; ++m) {
      const int r = lane >> 2, c = 2 * (lane & 3);
      const uint32_t lo = trans ? elem(8 * m + c, r) : elem(8 * m + r, c);
      const uint32_t hi = trans ? elem(8 * m + c + 1, r) : elem(8 * m + r, c + 1);
      w.out[lane][m] = lo | (hi << 16);
    }
  }
}

// shfl.sync.bfly with the full member mask: lane l reads lane l ^ mask_l (its own value past the warp).
void shfl_xor(Warp& w) {
  for (int lane = 0; lane < 32; ++lane) {
    const uint32_t src = static_cast<uint32_t>(lane) ^ w.in[lane][1];
    w.out[lane][0] = src < 32 ? w.in[src][0] : w.in[lane][0];
  }
}

void complete(Warp& w) {
  switch (w.op) {
    case WarpOp::kShflXor:
      shfl_xor(w);
      break;
    case WarpOp::kLdmatrix:
      ldmatrix(w, false);
      break;
    case WarpOp::kLdmatrixTrans:
      ldmatrix(w, true);
      break;
    case WarpOp::kMmaBf16:
      mma<WarpOp::kMmaBf16>(w);
      break;
    case WarpOp::kMmaF16:
      mma<WarpOp::kMmaF16>(w);
      break;
  }
}

void land_copies(Fiber& f, int keep_groups) {
  const int last_landing = f.open_group - keep_groups;  // groups below this one land
  std::vector<PendingCopy> still;
  for (const PendingCopy& c : f.copies) {
    if (c.group < last_landing) {
      if (c.src != nullptr) {
        std::memcpy(c.dst, c.src, 16);
      } else {
        std::memset(c.dst, 0, 16);
      }
    } else {
      still.push_back(c);
    }
  }
  f.copies.swap(still);
}

std::vector<Fiber>& fiber_pool(int threads) {
  thread_local std::vector<Fiber> pool;
  if (static_cast<int>(pool.size()) < threads) {
    pool.resize(threads);
    for (Fiber& f : pool) {
      if (!f.stack) f.stack.reset(new unsigned char[kStackBytes]);
    }
  }
  return pool;
}

// Runs one CTA to completion; false when it failed or deadlocked.
bool run_cta(Cta& c, uint64_t& rng) {
  std::vector<Fiber>& fibers = *c.fibers;
  for (int i = 0; i < c.threads; ++i) {
    Fiber& f = fibers[i];
    f.linear = i;
    f.tid = uint3{static_cast<unsigned>(i % c.block.x), static_cast<unsigned>((i / c.block.x) % c.block.y),
                  static_cast<unsigned>(i / (c.block.x * c.block.y))};
    f.done = false;
    f.wait_on = nullptr;
    f.copies.clear();
    f.open_group = 0;
    start_fiber(f);
  }
  int live = c.threads;
  while (live > 0) {
    // A different starting thread on every pass, so that no ordering of the threads is relied on.
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    const int start = static_cast<int>(rng % static_cast<uint64_t>(c.threads));
    bool ran = false;
    for (int k = 0; k < c.threads; ++k) {
      Fiber& f = fibers[(start + k) % c.threads];
      if (f.done || (f.wait_on != nullptr && *f.wait_on == f.wait_value)) continue;
      f.wait_on = nullptr;
      c.current = &f;
      switch_context(c.scheduler, f.ctx);
      c.current = nullptr;
      ran = true;
      if (f.done) --live;
      if (c.failed) return false;
    }
    if (!ran) {
      int waiting = 0;
      for (int i = 0; i < c.threads; ++i) waiting += fibers[i].done ? 0 : 1;
      fail("deadlock: " + std::to_string(waiting) + " of " + std::to_string(c.threads) +
           " threads wait at a __syncthreads or warp instruction that the other threads never reach");
      return false;
    }
  }
  return true;
}

}  // namespace

uint3 thread_idx() {
  return cta().current->tid;
}

uint3 block_idx() {
  return cta().index;
}

dim3 grid_dim() {
  return cta().grid;
}

dim3 block_dim() {
  return cta().block;
}

void sync_threads() {
  Cta& c = cta();
  const uint64_t seen = c.barrier_generation;
  if (++c.barrier_arrived == c.threads) {
    c.barrier_arrived = 0;
    ++c.barrier_generation;
  } else {
    wait_for(&c.barrier_generation, seen);
  }
}

unsigned char* dynamic_smem() {
  return cta().smem;
}

uint32_t smem_offset(const void* p) {
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < cta().smem || b >= cta().smem + cta().smem_bytes) {
    fail("a shared-memory address lies outside the CTA's shared memory");
    return 0;
  }
  return static_cast<uint32_t>(b - cta().smem);
}

void warp_op(WarpOp op, const uint32_t (&in)[kMaxIn], uint32_t (&out)[kMaxOut]) {
  Cta& c = cta();
  const int lane = c.current->linear % 32;
  Warp& w = c.warps[c.current->linear / 32];
  if (w.arrived == 0) {
    w.op = op;
  } else if (w.op != op) {
    fail("lanes of one warp issued different warp instructions (divergent warp)");
  }
  std::memcpy(w.in[lane], in, sizeof(in));
  const uint64_t seen = w.generation;
  if (++w.arrived == 32) {
    complete(w);
    w.arrived = 0;
    ++w.generation;
  } else {
    wait_for(&w.generation, seen);
  }
  std::memcpy(out, w.out[lane], sizeof(out));
}

void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t offset = smem_offset(smem);
  if (offset % 16 != 0 || !in_smem(offset, 16)) {
    fail("cp.async: shared destination " + std::to_string(offset) + " is not a 16-byte aligned chunk inside the CTA");
    return;
  }
  if (valid && reinterpret_cast<uintptr_t>(gmem) % 16 != 0) {
    fail("cp.async: global source is not 16-byte aligned");
    return;
  }
  Fiber& f = *cta().current;
  f.copies.push_back(PendingCopy{static_cast<unsigned char*>(smem),
                                 valid ? static_cast<const unsigned char*>(gmem) : nullptr, f.open_group});
}

void cp_async_commit() {
  ++cta().current->open_group;
}

void cp_async_wait(int pending) {
  land_copies(*cta().current, pending);
}

cudaError_t launch(dim3 grid, int threads, size_t smem_bytes, const std::function<void()>& body) {
  t_error.clear();
  if (threads <= 0 || threads > kMaxThreads || threads % 32 != 0) {
    t_error = "launch: " + std::to_string(threads) + " threads per CTA (the kernels use whole warps, at most 1024)";
    return cudaErrorLaunchFailure;
  }
  if (smem_bytes > kMaxSmemBytes) {
    t_error = "launch: " + std::to_string(smem_bytes) + " bytes of shared memory per CTA, more than sm_80's " +
              std::to_string(kMaxSmemBytes);
    return cudaErrorLaunchFailure;
  }
  std::vector<unsigned char> smem(smem_bytes + 16);
  Cta c;
  c.grid = grid;
  c.block = dim3(static_cast<unsigned>(threads), 1, 1);
  c.threads = threads;
  c.smem = smem.data() + (16 - reinterpret_cast<uintptr_t>(smem.data()) % 16) % 16;
  c.smem_bytes = smem_bytes;
  c.fibers = &fiber_pool(threads);
  c.body = &body;
  uint64_t rng = 0x9E3779B97F4A7C15ull;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        c.index = uint3{x, y, z};
        c.warps.assign(threads / 32, Warp{});
        c.barrier_generation = 0;
        c.barrier_arrived = 0;
        std::memset(c.smem, 0xFF, smem_bytes);  // NaN in fp16, bf16 and fp32
        t_cta = &c;
        const bool ok = run_cta(c, rng);
        t_cta = nullptr;
        if (!ok) return cudaErrorLaunchFailure;
      }
    }
  }
  return cudaSuccess;
}

const char* last_error() {
  return t_error.c_str();
}

int sm_count() {
  const char* v = std::getenv("AVAR_EMULATED_SM_COUNT");
  const int n = v != nullptr ? std::atoi(v) : 0;
  return n > 0 ? n : 8;
}

size_t smem_optin_limit() {
  return kMaxSmemBytes;
}

}  // namespace avar::cuda_emulation
