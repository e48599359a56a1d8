// The host-facing side of the emulated CUDA device (emulation.h): which GPU it pretends to be, the checks it runs
// on every launch, and the buffers a launch may touch. Plain C++ with no CUDA or torch headers, so that the host
// code (attention_ops.cpp, cuda_dispatch.cpp, bindings.cpp) can include it without emulation.h's macros.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace avar::cuda_emulation {

// The limits of one compute capability, from the CUDA C++ Programming Guide's table of technical specifications
// per compute capability; the SM count is the one of the named GPU (a product fact, not an arch fact).
struct ArchProfile {
  const char* name;  // "sm_86"
  int major, minor;
  const char* gpu;               // the GPU whose multiprocessor count sm_count is
  int sm_count;                  // cudaDevAttrMultiProcessorCount
  size_t smem_optin;             // cudaDevAttrMaxSharedMemoryPerBlockOptin: dynamic shared memory per CTA
  size_t smem_per_sm;            // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  int max_threads_per_block;     // cudaDevAttrMaxThreadsPerBlock
  int max_registers_per_thread;  // what ptxas may give one thread
  int registers_per_sm;          // cudaDevAttrMaxRegistersPerMultiprocessor (= per block)
};

// The profile launches are checked against (sm_80 until set_arch_profile chooses another one). Per process.
const ArchProfile& arch_profile();

// Chooses the profile by name ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"); false for an unknown name.
bool set_arch_profile(const std::string& name);

// The names set_arch_profile takes, comma separated.
std::string arch_profile_names();

// The emulated cudaDeviceGetAttribute(cudaDevAttrMaxSharedMemoryPerBlockOptin): what a CTA may ask for.
size_t smem_optin_limit();

// The emulated cudaDevAttrMultiProcessorCount: AVAR_EMULATED_SM_COUNT when set (tests pin the split heuristics
// with it), else the profile's GPU's count.
int sm_count();

// How launch failures name the device: "emulated sm_86 (compute capability 8.6, A10 limits)".
std::string device_name();

// Seeds the scheduler: the order in which warps run between barriers, where a thread is preempted at a shared
// memory access, and when each cp.async copy lands between its issue and its wait. Each launch starts from the
// seed, so a failure replays under the same seed.
void set_seed(uint64_t seed);
uint64_t seed();

// Shared-memory race detection and bounds checks of global accesses (both on unless turned off, e.g. to time
// the emulation itself).
void set_checks(bool on);
bool checks();

// Global memory a launch may read or write: every access of a kernel outside the registered buffers (and the
// thread's own stack) fails the launch, naming the nearest buffer. The host code registers each tensor it hands
// to the kernels for the duration of the op (BufferScope); launches with no buffer registered at all are not
// checked.
class BufferScope {
 public:
  BufferScope() = default;
  BufferScope(const BufferScope&) = delete;
  BufferScope& operator=(const BufferScope&) = delete;
  ~BufferScope();
  // `name` must outlive the scope (a string literal).
  void add(const char* name, const void* begin, size_t bytes);

 private:
  int added_ = 0;
};

}  // namespace avar::cuda_emulation
