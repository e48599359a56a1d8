// The extension module avar_ops._C: registers the avar ops with the dispatcher (torch.ops.avar.*) and exposes
// build facts to Python.
#include <torch/extension.h>
#include <torch/library.h>

#include "attention/attention_ops.h"
#ifdef AVAR_WITH_CUDA
#include "attention/cuda_dispatch.h"
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

TORCH_LIBRARY_IMPL(avar, CPU, m) {
  m.impl("attention_fwd", &avar::attention_fwd);
  m.impl("attention_bwd", &avar::attention_bwd);
  m.impl("attention_key_mass", &avar::attention_key_mass);
}

#ifdef AVAR_WITH_CUDA
TORCH_LIBRARY_IMPL(avar, CUDA, m) {
  m.impl("attention_fwd", &avar::attention_fwd);
  m.impl("attention_bwd", &avar::attention_bwd);
  m.impl("attention_key_mass", &avar::attention_key_mass);
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "avar fused attention kernels (ops are registered as torch.ops.avar.*)";
#ifdef AVAR_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cpu_capability") = AVAR_CPU_CAPABILITY_NAME;
#ifdef AVAR_WITH_CUDA
  m.def("cuda_decode_splits", &avar::cuda_dispatch::decode_splits_on_current_device, py::arg("batch"),
        py::arg("heads"), py::arg("seqlen_q"), py::arg("seqlen_k"),
        "Key splits (flash-decoding) the CUDA forward uses for these sizes on the current device; 1 = no split.");
#endif
  m.def("set_poison_outputs", &avar::set_poison_outputs,
        "Fill every output buffer with NaN before the kernel writes it (for tests).");
}
