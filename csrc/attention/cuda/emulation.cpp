// The fiber scheduler and the warp instructions of the emulated CUDA device (emulation.h).
#include "emulation.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
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

constexpr size_t kStackBytes = 256 * 1024;  // per CUDA thread; unoptimised builds keep every array on it

// CUDA C++ Programming Guide, technical specifications per compute capability: 163 KB (8.0), 99 KB (8.6, 8.9,
// 12.0) and 227 KB (9.0, 10.0) of dynamic shared memory per CTA after opting in; 164 / 100 / 228 KB per SM;
// 1024 threads per CTA, 255 registers per thread and 64 K registers per SM everywhere.
constexpr ArchProfile kProfiles[] = {
    {"sm_80", 8, 0, "A100", 108, 166912, 167936, 1024, 255, 65536},
    {"sm_86", 8, 6, "A10", 72, 101376, 102400, 1024, 255, 65536},
    {"sm_89", 8, 9, "L40S", 142, 101376, 102400, 1024, 255, 65536},
    {"sm_90", 9, 0, "H100 SXM", 132, 232448, 233472, 1024, 255, 65536},
    {"sm_100", 10, 0, "B200", 148, 232448, 233472, 1024, 255, 65536},
    {"sm_120", 12, 0, "RTX 5090", 170, 101376, 102400, 1024, 255, 65536},
};

std::atomic<int> g_profile{0};
std::atomic<uint64_t> g_seed{0x9E3779B97F4A7C15ull};
std::atomic<bool> g_checks{true};

struct Buffer {
  const char* name;
  uintptr_t begin, end;
};
thread_local std::vector<Buffer> t_buffers;

enum class Access { kRead, kWrite, kAtomic };

const char* access_name(Access a) {
  return a == Access::kRead ? "reads" : a == Access::kWrite ? "writes" : "atomically updates";
}

struct PendingCopy {
  unsigned char* dst;
  const unsigned char* src;  // null: zero fill
  int group;
  bool landed;
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

// What the race detector knows of one byte of shared memory. Entries are stamped rather than cleared: `epoch`
// (CTA serial, barrier interval) says whether writer / readers / atomics describe the current interval, and
// `written` names the CTA that last wrote the byte.
struct Shadow {
  uint64_t epoch;
  uint32_t readers;  // warps that read it in the interval (bit per warp)
  uint32_t atomics;  // warps that updated it atomically in the interval
  uint32_t written;  // serial of the CTA that wrote it last
  int16_t writer;    // the warp that wrote it in the interval, −1 none
  int16_t pending;   // 1 + the thread whose cp.async into it is not yet waited for, 0 none
};

struct Cta {
  LaunchConfig config;
  dim3 block;
  uint3 index;
  int threads = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  Shadow* shadow = nullptr;
  uint32_t serial = 0;
  bool checking = false;
  bool check_globals = false;
  uintptr_t host_stack_lo = 0, host_stack_bytes = 0;
  std::vector<Fiber>* fibers = nullptr;
  std::vector<Warp> warps;
  std::vector<int> order;
  uint64_t barrier_generation = 0;
  int barrier_arrived = 0;
  uint64_t rng = 0;
  Context scheduler;
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  bool failed = false;
};

// Read on every emulated instruction and memory access: initial-exec TLS avoids a __tsan_get_addr call per read.
__attribute__((tls_model("initial-exec"))) thread_local Cta* t_cta = nullptr;
thread_local std::string t_error;
thread_local uint32_t t_cta_serial = 0;

Cta& cta() {
  return *t_cta;
}

uint64_t next_random(uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

void fail(const std::string& what) {
  Cta& c = cta();
  c.failed = true;
  if (t_error.empty()) {
    t_error = kernel_name(c.config.kernel) + ": " + what + " (block (" + std::to_string(c.index.x) + ", " +
              std::to_string(c.index.y) + ", " + std::to_string(c.index.z) + "), thread " +
              std::to_string(c.current ? c.current->linear : -1) + ", seed " + std::to_string(seed()) + ")";
  }
}

// Suspends the current fiber until *generation moves past `seen` (null: it may run again at the next pass).
void wait_for(const uint64_t* generation, uint64_t seen) {
  Fiber* f = cta().current;
  f->wait_on = generation;
  f->wait_value = seen;
  switch_context(f->ctx, cta().scheduler);
}

// Lands each copy of f still in flight with probability 1/4: a copy lands somewhere between its issue and the
// wait that covers it, and code that reads it early sees either value.
void maybe_land(Cta& c, Fiber& f) {
  for (PendingCopy& p : f.copies) {
    if (p.landed || (next_random(c.rng) & 3) != 0) continue;
    if (p.src != nullptr) {
      std::memcpy(p.dst, p.src, 16);
    } else {
      std::memset(p.dst, 0, 16);
    }
    p.landed = true;
  }
}

// Every fiber starts here and never returns: when its thread of the kernel is done it hands control back to the
// scheduler for good.
void fiber_main() {
  Cta& c = cta();
  c.body(c.ctx);
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

std::string interval_name(const Cta& c) {
  return "barrier interval " + std::to_string(c.barrier_generation);
}

// Records one access of `warp` (thread `thread`) to shared bytes [offset, offset + bytes) and fails the launch
// at the first conflict.
void shared_access(Cta& c, uint32_t offset, uint32_t bytes, Access kind, int thread) {
  if (!in_smem(offset, bytes)) {
    fail("a " + std::to_string(bytes) + "-byte shared-memory access at offset " + std::to_string(offset) +
         " runs past the CTA's " + std::to_string(c.smem_bytes) + " bytes");
    return;
  }
  const int warp = thread / 32;
  const uint32_t bit = 1u << warp, others = ~bit;
  const uint64_t epoch = (static_cast<uint64_t>(c.serial) << 32) | (c.barrier_generation & 0xFFFFFFFFu);
  for (uint32_t i = 0; i < bytes; ++i) {
    Shadow& s = c.shadow[offset + i];
    const std::string where = "shared-memory byte " + std::to_string(offset + i);
    if (s.pending != 0) {
      const int owner = s.pending - 1;
      if (owner / 32 == warp) {
        fail("warp " + std::to_string(warp) + " " + access_name(kind) + " " + where +
             " before the cp.async.wait_group that covers the copy thread " + std::to_string(owner) +
             " issued into it (the copy may not have landed)");
      } else {
        fail("shared-memory race: warp " + std::to_string(warp) + " " + access_name(kind) + " " + where +
             " while a cp.async of warp " + std::to_string(owner / 32) + " (thread " + std::to_string(owner) +
             ") into it is in flight (issued, not yet waited for and published by a __syncthreads)");
      }
      return;
    }
    if (s.epoch != epoch) {
      s.epoch = epoch;
      s.writer = -1;
      s.readers = 0;
      s.atomics = 0;
    }
    int other = -1;
    const char* other_did = "";
    if (s.writer >= 0 && s.writer != warp) {
      other = s.writer;
      other_did = "wrote";
    } else if (kind != Access::kRead && (s.readers & others) != 0) {
      other = __builtin_ctz(s.readers & others);
      other_did = "read";
    } else if (kind != Access::kAtomic && (s.atomics & others) != 0) {
      other = __builtin_ctz(s.atomics & others);
      other_did = "atomically updated";
    }
    if (other >= 0) {
      fail("shared-memory race: warp " + std::to_string(warp) + " " + access_name(kind) + " " + where +
           ", which warp " + std::to_string(other) + " " + other_did + " in the same " + interval_name(c) +
           " (no __syncthreads between them)");
      return;
    }
    if (kind != Access::kWrite && s.written != c.serial) {
      fail("warp " + std::to_string(warp) + " " + access_name(kind) + " " + where +
           ", which no thread of this CTA has written (uninitialised shared memory)");
      return;
    }
    if (kind == Access::kRead) {
      s.readers |= bit;
    } else if (kind == Access::kWrite) {
      s.writer = static_cast<int16_t>(warp);
      s.written = c.serial;
    } else {
      s.atomics |= bit;
    }
  }
}

std::string hex(uintptr_t a) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(a));
  return buf;
}

// Fails unless global bytes [a, a + bytes) lie inside one registered buffer.
void global_access(uintptr_t a, size_t bytes, Access kind) {
  const Buffer* nearest = nullptr;
  uintptr_t distance = ~uintptr_t{0};
  for (const Buffer& b : t_buffers) {
    if (a >= b.begin && a + bytes <= b.end) return;
    const uintptr_t d = a < b.begin ? b.begin - a : a + bytes > b.end ? a + bytes - b.end : 0;
    if (d < distance) {
      distance = d;
      nearest = &b;
    }
  }
  std::string what = std::string("out-of-bounds global access: ") + access_name(kind) + " " + std::to_string(bytes) +
                     " bytes at " + hex(a) + ", inside no buffer of this op";
  if (nearest != nullptr) {
    what += a < nearest->begin ? "; it starts " + std::to_string(nearest->begin - a) + " bytes before '"
                               : "; it ends " + std::to_string(a + bytes - nearest->end) + " bytes past the end of '";
    what += std::string(nearest->name) + "' (" + std::to_string(nearest->end - nearest->begin) + " bytes)";
  }
  fail(what);
}

// The hook of every instrumented memory access of a kernel.
inline void on_access(const void* p, size_t bytes, Access kind) {
  Cta* c = t_cta;
  if (c == nullptr || !c->checking || c->failed || c->current == nullptr) return;
  const auto a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t in_smem = a - reinterpret_cast<uintptr_t>(c->smem);
  if (in_smem < c->smem_bytes) {
    // Preempting here interleaves the warps at memory-access granularity, not just at warp instructions.
    if ((next_random(c->rng) & 15) == 0) {
      maybe_land(*c, *c->current);
      wait_for(nullptr, 0);
    }
    shared_access(*c, static_cast<uint32_t>(in_smem), static_cast<uint32_t>(bytes), kind, c->current->linear);
    return;
  }
  if (a - reinterpret_cast<uintptr_t>(c->current->stack.get()) < kStackBytes) return;
  if (a - c->host_stack_lo < c->host_stack_bytes) return;  // the launch's arguments, on the launching thread
  if (c->check_globals) global_access(a, bytes, kind);
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
  Cta& c = cta();
  if (c.checking) {
    const int warp = c.current->linear / 32;
    for (int lane = 0; lane < 32 && !c.failed; ++lane) {
      shared_access(c, w.in[lane][0], 16, Access::kRead, warp * 32 + lane);
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

// Lands (if not yet landed) the copies of f in groups that are complete once only `keep_groups` remain in
// flight, and publishes them to the race detector as writes of f's warp in the current barrier interval.
void land_copies(Cta& c, Fiber& f, int keep_groups) {
  const int last_landing = f.open_group - keep_groups;  // groups below this one land
  std::vector<PendingCopy> still;
  for (PendingCopy& p : f.copies) {
    if (p.group >= last_landing) {
      still.push_back(p);
      continue;
    }
    if (!p.landed) {
      if (p.src != nullptr) {
        std::memcpy(p.dst, p.src, 16);
      } else {
        std::memset(p.dst, 0, 16);
      }
    }
    if (c.checking) {
      const uint32_t offset = static_cast<uint32_t>(p.dst - c.smem);
      for (uint32_t i = 0; i < 16; ++i) c.shadow[offset + i].pending = 0;
      shared_access(c, offset, 16, Access::kWrite, f.linear);
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

Shadow* shadow_pool(size_t bytes) {
  thread_local std::vector<Shadow> pool;
  if (pool.size() < bytes) pool.resize(bytes, Shadow{0, 0, 0, 0, -1, 0});
  return pool.data();
}

// Runs one CTA to completion; false when it failed or deadlocked.
bool run_cta(Cta& c) {
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
  bool ok = true;
  while (live > 0 && ok) {
    // A fresh order of the threads on every pass, so that no interleaving of the warps is relied on.
    for (int i = c.threads - 1; i > 0; --i) {
      std::swap(c.order[i], c.order[next_random(c.rng) % static_cast<uint64_t>(i + 1)]);
    }
    bool ran = false;
    for (int k = 0; k < c.threads; ++k) {
      Fiber& f = fibers[c.order[k]];
      if (f.done || (f.wait_on != nullptr && *f.wait_on == f.wait_value)) continue;
      f.wait_on = nullptr;
      c.current = &f;
      switch_context(c.scheduler, f.ctx);
      c.current = nullptr;
      ran = true;
      if (f.done) --live;
      if (c.failed) {
        ok = false;
        break;
      }
    }
    if (ok && !ran) {
      int waiting = 0;
      for (int i = 0; i < c.threads; ++i) waiting += fibers[i].done ? 0 : 1;
      fail("deadlock: " + std::to_string(waiting) + " of " + std::to_string(c.threads) +
           " threads wait at a __syncthreads or warp instruction that the other threads never reach");
      ok = false;
    }
  }
  // Copies nobody waited for leave no mark on the next CTA's shadow.
  for (int i = 0; i < c.threads; ++i) {
    for (const PendingCopy& p : fibers[i].copies) {
      const uint32_t offset = static_cast<uint32_t>(p.dst - c.smem);
      for (uint32_t b = 0; b < 16; ++b) c.shadow[offset + b].pending = 0;
    }
    fibers[i].copies.clear();
  }
  return ok;
}

// The stack of the calling OS thread: the kernels read their arguments from it (the launch's frame).
void host_stack(uintptr_t& lo, uintptr_t& bytes) {
  thread_local uintptr_t t_lo = 0, t_bytes = 0;
  if (t_bytes == 0) {
    pthread_attr_t attr;
    void* addr = nullptr;
    size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      pthread_attr_getstack(&attr, &addr, &size);
      pthread_attr_destroy(&attr);
    }
    t_lo = reinterpret_cast<uintptr_t>(addr);
    t_bytes = size;
  }
  lo = t_lo;
  bytes = t_bytes;
}

// The name of a function of a loaded ELF object, from its symbol table (anonymous-namespace kernels are not in
// the dynamic symbol table dladdr reads); "" when there is none.
std::string elf_symbol(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) == 0 || info.dli_fname == nullptr) return "";
  if (info.dli_saddr == fn && info.dli_sname != nullptr) return info.dli_sname;
  const int fd = open(info.dli_fname, O_RDONLY);
  if (fd < 0) return "";
  struct stat st;
  std::string found;
  if (fstat(fd, &st) == 0 && static_cast<size_t>(st.st_size) > sizeof(Elf64_Ehdr)) {
    void* map = mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map != MAP_FAILED) {
      const auto* base = static_cast<const unsigned char*>(map);
      const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
      const uintptr_t want = reinterpret_cast<uintptr_t>(fn) - reinterpret_cast<uintptr_t>(info.dli_fbase);
      const bool sane =
          std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 && eh->e_ident[EI_CLASS] == ELFCLASS64 &&
          eh->e_shoff + static_cast<size_t>(eh->e_shnum) * sizeof(Elf64_Shdr) <= static_cast<size_t>(st.st_size);
      const auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + (sane ? eh->e_shoff : 0));
      for (int i = 0; sane && i < eh->e_shnum && found.empty(); ++i) {
        if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
        const auto* syms = reinterpret_cast<const Elf64_Sym*>(base + sh[i].sh_offset);
        const char* names = reinterpret_cast<const char*>(base + sh[sh[i].sh_link].sh_offset);
        for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); ++k) {
          if (ELF64_ST_TYPE(syms[k].st_info) == STT_FUNC && syms[k].st_value == want) {
            found = names + syms[k].st_name;
            break;
          }
        }
      }
      munmap(map, st.st_size);
    }
  }
  close(fd);
  return found;
}

}  // namespace

const ArchProfile& arch_profile() {
  return kProfiles[g_profile.load()];
}

bool set_arch_profile(const std::string& name) {
  for (size_t i = 0; i < sizeof(kProfiles) / sizeof(kProfiles[0]); ++i) {
    if (name == kProfiles[i].name) {
      g_profile.store(static_cast<int>(i));
      return true;
    }
  }
  return false;
}

std::string arch_profile_names() {
  std::string names;
  for (const ArchProfile& p : kProfiles) names += (names.empty() ? "" : ", ") + std::string(p.name);
  return names;
}

size_t smem_optin_limit() {
  return arch_profile().smem_optin;
}

int sm_count() {
  const char* v = std::getenv("AVAR_EMULATED_SM_COUNT");
  const int n = v != nullptr ? std::atoi(v) : 0;
  return n > 0 ? n : arch_profile().sm_count;
}

std::string device_name() {
  const ArchProfile& p = arch_profile();
  return std::string("emulated ") + p.name + " (compute capability " + std::to_string(p.major) + "." +
         std::to_string(p.minor) + ", " + p.gpu + " limits)";
}

void set_seed(uint64_t s) {
  g_seed.store(s);
}

uint64_t seed() {
  return g_seed.load();
}

void set_checks(bool on) {
  g_checks.store(on);
}

bool checks() {
  return g_checks.load();
}

BufferScope::~BufferScope() {
  t_buffers.resize(t_buffers.size() - static_cast<size_t>(added_));
}

void BufferScope::add(const char* name, const void* begin, size_t bytes) {
  const auto b = reinterpret_cast<uintptr_t>(begin);
  t_buffers.push_back(Buffer{name, b, b + bytes});
  ++added_;
}

std::string kernel_name(const void* kernel) {
  if (kernel == nullptr) return "a kernel";
  std::string name = elf_symbol(kernel);
  if (name.empty()) return "the kernel at " + hex(reinterpret_cast<uintptr_t>(kernel));
  int status = 0;
  char* demangled = abi::__cxa_demangle(name.c_str(), nullptr, nullptr, &status);
  if (status == 0 && demangled != nullptr) {
    name = demangled;
    std::free(demangled);
    // Keep the name and its template arguments: drop "(anonymous namespace)::" and cut the parameter list at
    // the first '(' outside <...>.
    if (name.rfind("void ", 0) == 0) name.erase(0, 5);  // a function template's demangled name has its type
    const std::string anon = "(anonymous namespace)::";
    for (size_t at = name.find(anon); at != std::string::npos; at = name.find(anon)) name.erase(at, anon.size());
    int depth = 0;
    for (size_t i = 0; i < name.size(); ++i) {
      if (name[i] == '<') ++depth;
      if (name[i] == '>') --depth;
      if (name[i] == '(' && depth == 0) {
        name.resize(i);
        break;
      }
    }
  }
  return name;
}

uint3 thread_idx() {
  return cta().current->tid;
}

uint3 block_idx() {
  return cta().index;
}

dim3 grid_dim() {
  return cta().config.grid;
}

dim3 block_dim() {
  return cta().block;
}

void sync_threads() {
  Cta& c = cta();
  maybe_land(c, *c.current);
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
  maybe_land(c, *c.current);
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
  Cta& c = cta();
  const uint32_t offset = smem_offset(smem);
  if (offset % 16 != 0 || !in_smem(offset, 16)) {
    fail("cp.async: shared destination " + std::to_string(offset) + " is not a 16-byte aligned chunk inside the CTA");
    return;
  }
  if (valid && reinterpret_cast<uintptr_t>(gmem) % 16 != 0) {
    fail("cp.async: global source is not 16-byte aligned");
    return;
  }
  Fiber& f = *c.current;
  if (c.checking) {
    if (valid && c.check_globals) global_access(reinterpret_cast<uintptr_t>(gmem), 16, Access::kRead);
    // The copy may land at once: it is a write into bytes no other warp may touch in this interval, and no other
    // copy may be in flight into them.
    shared_access(c, offset, 16, Access::kWrite, f.linear);
    for (uint32_t i = 0; i < 16; ++i) c.shadow[offset + i].pending = static_cast<int16_t>(f.linear + 1);
  }
  f.copies.push_back(PendingCopy{static_cast<unsigned char*>(smem),
                                 valid ? static_cast<const unsigned char*>(gmem) : nullptr, f.open_group, false});
}

void cp_async_commit() {
  Cta& c = cta();
  ++c.current->open_group;
  maybe_land(c, *c.current);
}

void cp_async_wait(int pending) {
  Cta& c = cta();
  land_copies(c, *c.current, pending);
}

float atomic_add(float* address, float value) {
  on_access(address, sizeof(float), Access::kAtomic);
  // Fibers of one launch never run at the same time, so a plain read-modify-write is atomic here.
  const float old = *address;
  *address = old + value;
  return old;
}

cudaError_t launch(const LaunchConfig& config, void (*body)(void*), void* ctx) {
  t_error.clear();
  const ArchProfile& prof = arch_profile();
  const std::string kernel = kernel_name(config.kernel);
  const auto refuse = [&](cudaError_t err, const std::string& what) {
    t_error = kernel + ": " + what + " (" + device_name() + ")";
    return err;
  };
  if (config.threads <= 0 || config.threads > prof.max_threads_per_block) {
    return refuse(cudaErrorInvalidConfiguration, std::to_string(config.threads) +
                                                     " threads per CTA; the device allows 1 to " +
                                                     std::to_string(prof.max_threads_per_block));
  }
  if (config.threads % 32 != 0) {
    return refuse(cudaErrorInvalidConfiguration,
                  std::to_string(config.threads) + " threads per CTA: the emulation runs whole warps only");
  }
  if (config.grid.x == 0 || config.grid.y == 0 || config.grid.z == 0 || config.grid.x > 2147483647u ||
      config.grid.y > 65535 || config.grid.z > 65535) {
    return refuse(cudaErrorInvalidConfiguration,
                  "grid (" + std::to_string(config.grid.x) + ", " + std::to_string(config.grid.y) + ", " +
                      std::to_string(config.grid.z) + "); CUDA allows 1..2^31-1 × 1..65535 × 1..65535");
  }
  if (config.smem_bytes > prof.smem_optin) {
    // On a GPU cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) refuses it.
    return refuse(cudaErrorInvalidValue, "asks for " + std::to_string(config.smem_bytes) +
                                             " bytes of dynamic shared memory per CTA; the device allows " +
                                             std::to_string(prof.smem_optin) +
                                             " (cudaDevAttrMaxSharedMemoryPerBlockOptin)");
  }
  if (config.registers_per_thread > prof.max_registers_per_thread ||
      static_cast<int64_t>(config.registers_per_thread) * config.threads > prof.registers_per_sm) {
    return refuse(cudaErrorLaunchOutOfResources,
                  std::to_string(config.registers_per_thread) + " registers per thread × " +
                      std::to_string(config.threads) + " threads; the device has " +
                      std::to_string(prof.max_registers_per_thread) + " per thread and " +
                      std::to_string(prof.registers_per_sm) + " per multiprocessor (too many resources requested)");
  }
  std::vector<unsigned char> smem(config.smem_bytes + 16);
  Cta c;
  c.config = config;
  c.block = dim3(static_cast<unsigned>(config.threads), 1, 1);
  c.threads = config.threads;
  c.smem = smem.data() + (16 - reinterpret_cast<uintptr_t>(smem.data()) % 16) % 16;
  c.smem_bytes = config.smem_bytes;
  c.shadow = shadow_pool(config.smem_bytes);
  c.checking = checks();
  c.check_globals = !t_buffers.empty();
  host_stack(c.host_stack_lo, c.host_stack_bytes);
  c.fibers = &fiber_pool(config.threads);
  c.order.resize(config.threads);
  for (int i = 0; i < config.threads; ++i) c.order[i] = i;
  c.body = body;
  c.ctx = ctx;
  c.rng = seed() | 1;  // xorshift needs a non-zero state
  for (unsigned z = 0; z < config.grid.z; ++z) {
    for (unsigned y = 0; y < config.grid.y; ++y) {
      for (unsigned x = 0; x < config.grid.x; ++x) {
        c.index = uint3{x, y, z};
        c.warps.assign(config.threads / 32, Warp{});
        c.barrier_generation = 0;
        c.barrier_arrived = 0;
        c.serial = ++t_cta_serial;
        std::memset(c.smem, 0xFF, config.smem_bytes);  // NaN in fp16, bf16 and fp32
        t_cta = &c;
        const bool ok = run_cta(c);
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

}  // namespace avar::cuda_emulation

// The hooks of the compiler's thread-sanitizer instrumentation (-fsanitize=thread), called before every load and
// store of the kernel sources of the emulation build (setup.py compiles them, and only them, with it). They
// replace the sanitizer's runtime, which is not linked: outside a launch they return at once.
#define AVAR_TSAN_EXPORT extern "C" __attribute__((visibility("default")))
namespace {
using avar::cuda_emulation::Access;
inline void tsan_read(const void* p, size_t n) {
  avar::cuda_emulation::on_access(p, n, Access::kRead);
}
inline void tsan_write(const void* p, size_t n) {
  avar::cuda_emulation::on_access(p, n, Access::kWrite);
}
}  // namespace

AVAR_TSAN_EXPORT void __tsan_init() {}
AVAR_TSAN_EXPORT void __tsan_func_entry(void*) {}
AVAR_TSAN_EXPORT void __tsan_func_exit() {}
AVAR_TSAN_EXPORT void __tsan_vptr_update(void**, void*) {}
AVAR_TSAN_EXPORT void __tsan_vptr_read(void**) {}
#define AVAR_TSAN_SIZED(n)                                     \
  AVAR_TSAN_EXPORT void __tsan_read##n(void* p) {              \
    tsan_read(p, n);                                           \
  }                                                            \
  AVAR_TSAN_EXPORT void __tsan_write##n(void* p) {             \
    tsan_write(p, n);                                          \
  }                                                            \
  AVAR_TSAN_EXPORT void __tsan_unaligned_read##n(void* p) {    \
    tsan_read(p, n);                                           \
  }                                                            \
  AVAR_TSAN_EXPORT void __tsan_unaligned_write##n(void* p) {   \
    tsan_write(p, n);                                          \
  }                                                            \
  AVAR_TSAN_EXPORT void __tsan_volatile_read##n(void* p) {     \
    tsan_read(p, n);                                           \
  }                                                            \
  AVAR_TSAN_EXPORT void __tsan_volatile_write##n(void* p) {    \
    tsan_write(p, n);                                          \
  }                                                            \
  AVAR_TSAN_EXPORT void __tsan_read##n##_pc(void* p, void*) {  \
    tsan_read(p, n);                                           \
  }                                                            \
  AVAR_TSAN_EXPORT void __tsan_write##n##_pc(void* p, void*) { \
    tsan_write(p, n);                                          \
  }
AVAR_TSAN_SIZED(1)
AVAR_TSAN_SIZED(2)
AVAR_TSAN_SIZED(4)
AVAR_TSAN_SIZED(8)
AVAR_TSAN_SIZED(16)
#undef AVAR_TSAN_SIZED
AVAR_TSAN_EXPORT void __tsan_read_range(void* p, size_t n) {
  tsan_read(p, n);
}
AVAR_TSAN_EXPORT void __tsan_write_range(void* p, size_t n) {
  tsan_write(p, n);
}
// Clang turns memcpy / memset / memmove of instrumented code into these.
AVAR_TSAN_EXPORT void* __tsan_memcpy(void* dst, const void* src, size_t n) {
  tsan_read(src, n);
  tsan_write(dst, n);
  return std::memcpy(dst, src, n);
}
AVAR_TSAN_EXPORT void* __tsan_memmove(void* dst, const void* src, size_t n) {
  tsan_read(src, n);
  tsan_write(dst, n);
  return std::memmove(dst, src, n);
}
AVAR_TSAN_EXPORT void* __tsan_memset(void* dst, int v, size_t n) {
  tsan_write(dst, n);
  return std::memset(dst, v, n);
}
