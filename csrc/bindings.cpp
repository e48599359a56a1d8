// The extension module avar_ops._C (avar_ops._C_emu in an emulation build, see cuda/emulation.h): registers the
// avar ops with the dispatcher (torch.ops.avar.*), one implementation per dispatch key, and exposes build facts
// and test switches to Python through the plain Python C API (no pybind11: torch/extension.h is the slowest
// header of the build).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "attention/attention_ops.h"
#if defined(AVAR_WITH_CUDA) || defined(AVAR_CUDA_EMULATION)
#include "attention/cuda_dispatch.h"
#define AVAR_CUDA_HOST_CODE 1
#endif
#ifdef AVAR_CUDA_EMULATION
#include "attention/cuda/emulated_device.h"
#include "attention/cuda/emulation_selftest.h"
#endif

#ifndef AVAR_CPU_CAPABILITY_NAME
#define AVAR_CPU_CAPABILITY_NAME "DEFAULT"
#endif

TORCH_LIBRARY(avar, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_group, Tensor? bias, Tensor? logit_scale, "
      "float scale, bool causal, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "bool return_mass) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor? dmass, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? mass, Tensor? key_group, Tensor? bias, Tensor? logit_scale, float scale, bool causal, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool need_dbias, "
      "bool need_dlogit_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "attention_key_mass(Tensor q, Tensor k, Tensor lse, Tensor query_weight, Tensor? key_group, Tensor? bias, "
      "Tensor? logit_scale, float scale, bool causal, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k) -> Tensor");
}

namespace {

template <typename Ops>
void register_ops(torch::Library& m) {
  m.impl("attention_fwd", &Ops::fwd);
  m.impl("attention_bwd", &Ops::bwd);
  m.impl("attention_key_mass", &Ops::key_mass);
}

#ifdef AVAR_CUDA_EMULATION
using CpuOps = avar::OpsOn<avar::cuda_dispatch::kEmulationBackend, avar::NoScope>;
#else
using CpuOps = avar::OpsOn<avar::kCpuBackend, avar::NoScope>;
#endif
#ifdef AVAR_WITH_CUDA
using CudaOps = avar::OpsOn<avar::cuda_dispatch::kCudaBackend, avar::cuda_dispatch::DeviceOf>;
#else
using CudaOps = avar::OpsOn<avar::kCpuBackend, avar::RefuseWithoutCudaKernels>;
#endif

}  // namespace

TORCH_LIBRARY_IMPL(avar, CPU, m) {
  register_ops<CpuOps>(m);
}
TORCH_LIBRARY_IMPL(avar, CUDA, m) {
  register_ops<CudaOps>(m);
}

// ---------------------------------------------------------------------------------------------------------
// The Python module: with_cuda, cpu_capability, and the switches tests and debugging use.

namespace {

PyObject* py_set_poison_outputs(PyObject*, PyObject* args) {
  int on = 0;
  if (!PyArg_ParseTuple(args, "p:set_poison_outputs", &on)) return nullptr;
  avar::set_poison_outputs(on != 0);
  Py_RETURN_NONE;
}

PyObject* py_set_input_checks(PyObject*, PyObject* args) {
  int on = 0;
  if (!PyArg_ParseTuple(args, "p:set_input_checks", &on)) return nullptr;
  avar::set_input_checks(on != 0);
  Py_RETURN_NONE;
}

PyObject* py_input_checks(PyObject*, PyObject*) {
  return PyBool_FromLong(avar::input_checks() ? 1 : 0);
}

#ifdef AVAR_CUDA_HOST_CODE
// C++ exceptions must not cross into Python: turn them into a RuntimeError.
template <typename F>
PyObject* guarded(F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* py_cuda_decode_splits(PyObject*, PyObject* args) {
  long long batch = 0, heads = 0, kv_heads = 0, seqlen_q = 0, seqlen_k = 0, head_dim = 0;
  if (!PyArg_ParseTuple(args, "LLLLLL:cuda_decode_splits", &batch, &heads, &kv_heads, &seqlen_q, &seqlen_k,
                        &head_dim)) {
    return nullptr;
  }
  return guarded([&] {
    return PyLong_FromLong(
        avar::cuda_dispatch::decode_splits_on_current_device(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim));
  });
}

PyObject* py_set_cuda_decode_splits(PyObject*, PyObject* args) {
  int splits = 0;
  if (!PyArg_ParseTuple(args, "i:set_cuda_decode_splits", &splits)) return nullptr;
  if (splits < 0) {
    PyErr_Format(PyExc_ValueError, "set_cuda_decode_splits: splits must be >= 0 (0 = the heuristic), got %d", splits);
    return nullptr;
  }
  avar::cuda_dispatch::set_forced_decode_splits(splits);
  Py_RETURN_NONE;
}

PyObject* py_cuda_backward_splits(PyObject*, PyObject* args) {
  long long batch = 0, heads = 0, kv_heads = 0, seqlen_q = 0, seqlen_k = 0, head_dim = 0;
  if (!PyArg_ParseTuple(args, "LLLLLL:cuda_backward_splits", &batch, &heads, &kv_heads, &seqlen_q, &seqlen_k,
                        &head_dim)) {
    return nullptr;
  }
  return guarded([&] {
    return PyLong_FromLong(
        avar::cuda_dispatch::backward_splits_on_current_device(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim));
  });
}

PyObject* py_set_cuda_backward_splits(PyObject*, PyObject* args) {
  int splits = 0;
  if (!PyArg_ParseTuple(args, "i:set_cuda_backward_splits", &splits)) return nullptr;
  if (splits < 0) {
    PyErr_Format(PyExc_ValueError, "set_cuda_backward_splits: splits must be >= 0 (0 = the heuristic), got %d", splits);
    return nullptr;
  }
  avar::cuda_dispatch::set_forced_backward_splits(splits);
  Py_RETURN_NONE;
}

// The tile request of a shape name: "auto", "8x16" or "4x32" (warps × query rows per warp of the forward).
bool tile_request_of(const char* name, int* request) {
  const std::string n(name);
  if (n == "auto")
    *request = avar::cuda_dispatch::kTileAuto;
  else if (n == "8x16")
    *request = avar::cuda_dispatch::kTile8x16;
  else if (n == "4x32")
    *request = avar::cuda_dispatch::kTile4x32;
  else {
    PyErr_Format(PyExc_ValueError, "tile shape must be 'auto', '8x16' or '4x32', got '%s'", name);
    return false;
  }
  return true;
}

PyObject* plan_dict(const avar::cuda_dispatch::TilePlan& plan) {
  const bool tall = plan.fwd_shape == avar::cuda::FwdShape::k4x32;
  return Py_BuildValue("{s:s,s:i,s:i,s:i,s:n,s:i,s:i,s:i,s:n}", "forward", tall ? "4x32" : "8x16", "forward_warps",
                       tall ? 4 : 8, "forward_block_m", avar::cuda::kFwdBlockM, "forward_block_n", plan.fwd_block_n,
                       "forward_smem", static_cast<Py_ssize_t>(plan.fwd_smem), "backward_warps", plan.bwd_warps,
                       "backward_block_n", 16 * plan.bwd_warps, "backward_block_m", plan.bwd_block_m, "backward_smem",
                       static_cast<Py_ssize_t>(plan.bwd_smem));
}

PyObject* py_cuda_tiles(PyObject*, PyObject* args) {
  long long head_dim = 0, smem_limit = -1;
  const char* shape = nullptr;
  if (!PyArg_ParseTuple(args, "L|Lz:cuda_tiles", &head_dim, &smem_limit, &shape)) return nullptr;
  int request = 0;
  if (shape != nullptr && !tile_request_of(shape, &request)) return nullptr;
  return guarded([&] {
    if (smem_limit < 0 && shape == nullptr) {
      return plan_dict(avar::cuda_dispatch::plan_tiles_on_current_device(head_dim));
    }
    if (smem_limit < 0) {
      PyErr_SetString(PyExc_ValueError, "cuda_tiles: a shape needs an explicit smem_limit");
      return static_cast<PyObject*>(nullptr);
    }
    return plan_dict(avar::cuda_dispatch::plan_tiles(head_dim, smem_limit, request));
  });
}

PyObject* py_set_cuda_tile(PyObject*, PyObject* args) {
  const char* shape = nullptr;
  if (!PyArg_ParseTuple(args, "s:set_cuda_tile", &shape)) return nullptr;
  int request = 0;
  if (!tile_request_of(shape, &request)) return nullptr;
  avar::cuda_dispatch::set_tile_request(request);
  Py_RETURN_NONE;
}

PyObject* py_set_cuda_smem_limit(PyObject*, PyObject* args) {
  long long bytes = 0;
  if (!PyArg_ParseTuple(args, "L:set_cuda_smem_limit", &bytes)) return nullptr;
  if (bytes < 0) {
    PyErr_Format(PyExc_ValueError, "set_cuda_smem_limit: bytes must be >= 0 (0 = the device's), got %lld", bytes);
    return nullptr;
  }
  avar::cuda_dispatch::set_forced_smem_limit(bytes);
  Py_RETURN_NONE;
}

PyObject* py_cuda_gqa_pack(PyObject*, PyObject* args) {
  long long heads = 0, kv_heads = 0, seqlen_q = 0;
  if (!PyArg_ParseTuple(args, "LLL:cuda_gqa_pack", &heads, &kv_heads, &seqlen_q)) return nullptr;
  return PyLong_FromLong(avar::cuda_dispatch::gqa_pack(heads, kv_heads, seqlen_q));
}

PyObject* py_set_cuda_gqa_packing(PyObject*, PyObject* args) {
  const char* mode = nullptr;
  if (!PyArg_ParseTuple(args, "s:set_cuda_gqa_packing", &mode)) return nullptr;
  const std::string m(mode);
  if (m != "auto" && m != "off" && m != "on") {
    PyErr_Format(PyExc_ValueError, "set_cuda_gqa_packing: mode must be 'auto', 'off' or 'on', got '%s'", mode);
    return nullptr;
  }
  avar::cuda_dispatch::set_gqa_packing(m == "auto" ? 0 : m == "off" ? 1 : 2);
  Py_RETURN_NONE;
}
#endif

#ifdef AVAR_CUDA_EMULATION
PyObject* py_emulation_selftest(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s:emulation_selftest", &name)) return nullptr;
  const std::string result = avar::cuda::emulation_selftest(name);
  return PyUnicode_FromStringAndSize(result.data(), static_cast<Py_ssize_t>(result.size()));
}

PyObject* py_set_arch_profile(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s:set_arch_profile", &name)) return nullptr;
  if (!avar::cuda_emulation::set_arch_profile(name)) {
    PyErr_Format(PyExc_ValueError, "set_arch_profile: name must be one of %s, got '%s'",
                 avar::cuda_emulation::arch_profile_names().c_str(), name);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* py_arch_profile(PyObject*, PyObject*) {
  const avar::cuda_emulation::ArchProfile& p = avar::cuda_emulation::arch_profile();
  return Py_BuildValue("{s:s,s:(ii),s:s,s:i,s:n,s:n,s:i,s:i,s:i,s:s}", "name", p.name, "capability", p.major, p.minor,
                       "gpu", p.gpu, "sm_count", avar::cuda_emulation::sm_count(), "smem_optin",
                       static_cast<Py_ssize_t>(p.smem_optin), "smem_per_sm", static_cast<Py_ssize_t>(p.smem_per_sm),
                       "max_threads_per_block", p.max_threads_per_block, "max_registers_per_thread",
                       p.max_registers_per_thread, "registers_per_sm", p.registers_per_sm, "device",
                       avar::cuda_emulation::device_name().c_str());
}

PyObject* py_set_emulation_seed(PyObject*, PyObject* args) {
  unsigned long long seed = 0;
  if (!PyArg_ParseTuple(args, "K:set_emulation_seed", &seed)) return nullptr;
  avar::cuda_emulation::set_seed(seed);
  Py_RETURN_NONE;
}

PyObject* py_emulation_seed(PyObject*, PyObject*) {
  return PyLong_FromUnsignedLongLong(avar::cuda_emulation::seed());
}

PyObject* py_set_emulation_checks(PyObject*, PyObject* args) {
  int on = 0;
  if (!PyArg_ParseTuple(args, "p:set_emulation_checks", &on)) return nullptr;
  avar::cuda_emulation::set_checks(on != 0);
  Py_RETURN_NONE;
}

PyObject* py_emulation_checks(PyObject*, PyObject*) {
  return PyBool_FromLong(avar::cuda_emulation::checks() ? 1 : 0);
}
#endif

PyMethodDef kMethods[] = {
    {"set_poison_outputs", py_set_poison_outputs, METH_VARARGS,
     "set_poison_outputs(on): fill every output buffer with NaN before the kernel writes it (for tests)."},
    {"set_input_checks", py_set_input_checks, METH_VARARGS,
     "set_input_checks(on): run the value checks (they read tensor contents) on CUDA inputs too."},
    {"input_checks", py_input_checks, METH_NOARGS, "input_checks(): whether the value checks run on CUDA inputs."},
#ifdef AVAR_CUDA_HOST_CODE
    {"cuda_decode_splits", py_cuda_decode_splits, METH_VARARGS,
     "cuda_decode_splits(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim): key splits (flash-decoding) the "
     "CUDA forward uses for these sizes on the current device; 1 = no split."},
    {"set_cuda_decode_splits", py_set_cuda_decode_splits, METH_VARARGS,
     "set_cuda_decode_splits(n): use n key splits on every call (n >= 2 forces the split path, for tests); 0 "
     "restores the heuristic."},
    {"cuda_backward_splits", py_cuda_backward_splits, METH_VARARGS,
     "cuda_backward_splits(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim): CTAs that share each key block's "
     "steps in the CUDA backward on the current device; 1 = no split."},
    {"set_cuda_backward_splits", py_set_cuda_backward_splits, METH_VARARGS,
     "set_cuda_backward_splits(n): split every backward into n (n >= 2 forces the split path, for tests); 0 "
     "restores the heuristic."},
    {"cuda_tiles", py_cuda_tiles, METH_VARARGS,
     "cuda_tiles(head_dim[, smem_limit, shape]): the tiles (a dict: shapes, blocks, shared-memory bytes) the CUDA "
     "kernels use for this head dim on the current device, or on a device with smem_limit bytes of opt-in shared "
     "memory per block when asked for shape ('auto', '8x16', '4x32')."},
    {"set_cuda_tile", py_set_cuda_tile, METH_VARARGS,
     "set_cuda_tile(shape): the forward tile shape every call asks for, '8x16' (8 warps of 16 query rows, 64-key "
     "backward blocks) or '4x32' (4 warps of 32 rows, 128-key backward blocks where they fit); 'auto' restores the "
     "default."},
    {"set_cuda_smem_limit", py_set_cuda_smem_limit, METH_VARARGS,
     "set_cuda_smem_limit(bytes): plan tiles as if the device allowed this much shared memory per block (tests); "
     "0 restores the device's own limit."},
    {"cuda_gqa_pack", py_cuda_gqa_pack, METH_VARARGS,
     "cuda_gqa_pack(heads, kv_heads, seqlen_q): query heads the CUDA forward stacks in one tile (1 = none)."},
    {"set_cuda_gqa_packing", py_set_cuda_gqa_packing, METH_VARARGS,
     "set_cuda_gqa_packing(mode): 'on' packs the query heads of a GQA group whenever they fit (tests), 'off' never, "
     "'auto' restores the heuristic."},
#endif
#ifdef AVAR_CUDA_EMULATION
    {"emulation_selftest", py_emulation_selftest, METH_VARARGS,
     "emulation_selftest(name): runs one self-test kernel of the emulated device; returns its error message, or "
     "'' for a kernel that ran and computed what it should."},
    {"set_arch_profile", py_set_arch_profile, METH_VARARGS,
     "set_arch_profile(name): the GPU the emulated device is (sm_80, sm_86, sm_89, sm_90, sm_100, sm_120): its "
     "shared memory, thread and register limits and SM count; launches beyond them fail as on that GPU."},
    {"arch_profile", py_arch_profile, METH_NOARGS,
     "arch_profile(): the emulated device's profile as a dict (name, capability, gpu, sm_count, smem_optin, ...)."},
    {"set_emulation_seed", py_set_emulation_seed, METH_VARARGS,
     "set_emulation_seed(seed): seeds the warp order, the preemption points and the cp.async landing times."},
    {"emulation_seed", py_emulation_seed, METH_NOARGS, "emulation_seed(): the current seed."},
    {"set_emulation_checks", py_set_emulation_checks, METH_VARARGS,
     "set_emulation_checks(on): shared-memory race detection and global bounds checks (on by default)."},
    {"emulation_checks", py_emulation_checks, METH_NOARGS, "emulation_checks(): whether they are on."},
#endif
    {nullptr, nullptr, 0, nullptr}};

#ifdef AVAR_CUDA_EMULATION
constexpr const char* kModuleName = "_C_emu";
constexpr const char* kModuleDoc =
    "avar ops with the CUDA kernels on an emulated device: float16 / bfloat16 CPU tensors run them (for tests)";
#else
constexpr const char* kModuleName = "_C";
constexpr const char* kModuleDoc = "avar fused attention kernels (ops are registered as torch.ops.avar.*)";
#endif

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, kModuleName, kModuleDoc, -1, kMethods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

#ifdef AVAR_CUDA_EMULATION
PyMODINIT_FUNC PyInit__C_emu(void) {
#else
PyMODINIT_FUNC PyInit__C(void) {
#endif
  PyObject* m = PyModule_Create(&kModule);
  if (m == nullptr) return nullptr;
#ifdef AVAR_WITH_CUDA
  const bool with_cuda = true;
#else
  const bool with_cuda = false;
#endif
#ifdef AVAR_CUDA_EMULATION
  const bool cuda_emulation = true;
#else
  const bool cuda_emulation = false;
#endif
  if (PyModule_AddObject(m, "with_cuda", PyBool_FromLong(with_cuda ? 1 : 0)) < 0 ||
      PyModule_AddObject(m, "cuda_emulation", PyBool_FromLong(cuda_emulation ? 1 : 0)) < 0 ||
      PyModule_AddStringConstant(m, "cpu_capability", AVAR_CPU_CAPABILITY_NAME) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
