// The extension module avar_ops._C (avar_ops._C_emu in an emulation build, see cuda/emulation.h): registers the
// avar ops with the dispatcher (torch.ops.avar.*), one implementation per dispatch key, and exposes build facts
// and test switches to Python through the plain Python C API (no pybind11: torch/extension.h is the slowest
// header of the build).
#include <Python.h>
#include <torch/library.h>

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
  long long batch = 0, heads = 0, seqlen_q = 0, seqlen_k = 0;
  if (!PyArg_ParseTuple(args, "LLLL:cuda_decode_splits", &batch, &heads, &seqlen_q, &seqlen_k)) return nullptr;
  return guarded([&] {
    return PyLong_FromLong(avar::cuda_dispatch::decode_splits_on_current_device(batch, heads, seqlen_q, seqlen_k));
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
  long long batch = 0, heads = 0, kv_heads = 0, seqlen_q = 0, seqlen_k = 0;
  if (!PyArg_ParseTuple(args, "LLLLL:cuda_backward_splits", &batch, &heads, &kv_heads, &seqlen_q, &seqlen_k)) {
    return nullptr;
  }
  return guarded([&] {
    return PyLong_FromLong(
        avar::cuda_dispatch::backward_splits_on_current_device(batch, heads, kv_heads, seqlen_q, seqlen_k));
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
     "cuda_decode_splits(batch, heads, seqlen_q, seqlen_k): key splits (flash-decoding) the CUDA forward uses for "
     "these sizes on the current device; 1 = no split."},
    {"set_cuda_decode_splits", py_set_cuda_decode_splits, METH_VARARGS,
     "set_cuda_decode_splits(n): use n key splits on every call (n >= 2 forces the split path, for tests); 0 "
     "restores the heuristic."},
    {"cuda_backward_splits", py_cuda_backward_splits, METH_VARARGS,
     "cuda_backward_splits(batch, heads, kv_heads, seqlen_q, seqlen_k): CTAs that share each key block's steps in "
     "the CUDA backward on the current device; 1 = no split."},
    {"set_cuda_backward_splits", py_set_cuda_backward_splits, METH_VARARGS,
     "set_cuda_backward_splits(n): split every backward into n (n >= 2 forces the split path, for tests); 0 "
     "restores the heuristic."},
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
