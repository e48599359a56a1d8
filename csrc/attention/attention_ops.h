// The avar attention ops as the dispatcher sees them: argument checks, output allocation and Params, shared by
// every backend; a Backend supplies the kernels. bindings.cpp registers one implementation per dispatch key.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <tuple>

#include "params.h"

namespace avar {

// Tests turn this on: every output buffer is filled with NaN before a kernel writes it.
void set_poison_outputs(bool on);

// Value checks (key_group range, finite tables, cu_seqlens contents, max_seqlen against cu_seqlens) read tensor
// contents on the host. CPU inputs are always checked; CUDA inputs only while this switch is on, since reading
// device memory waits for the GPU. It starts on when the environment has AVAR_CHECK_INPUTS=1.
void set_input_checks(bool on);
bool input_checks();

// The kernels of one device type; called after every check has passed, with the current device set to the
// inputs' device.
struct Backend {
  void (*fwd)(const AttnFwdParams& p, at::ScalarType dtype);
  void (*bwd)(const AttnBwdParams& p, at::ScalarType dtype);
  void (*key_mass)(const KeyMassParams& p, at::ScalarType dtype);
};

extern const Backend kCpuBackend;

#ifdef AVAR_CUDA_EMULATION
// In an emulation build (cuda/emulation.h): whether CPU inputs of this dtype run on the emulated CUDA device,
// under the CUDA rules, rather than on the CPU kernels.
inline bool runs_on_emulated_device(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16;
}
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const Backend& backend, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_group, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& logit_scale, double scale, bool causal,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool return_mass);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const Backend& backend, const at::Tensor& dout, const std::optional<at::Tensor>& dmass,
    const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mass,
    const std::optional<at::Tensor>& key_group, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& logit_scale, double scale, bool causal,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool need_dbias, bool need_dlogit_scale);

at::Tensor attention_key_mass(const Backend& backend, const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                              const at::Tensor& query_weight, const std::optional<at::Tensor>& key_group,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& logit_scale,
                              double scale, bool causal, const std::optional<at::Tensor>& cu_seqlens_q,
                              const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                              int64_t max_seqlen_k);

// A tensor argument by name, possibly absent.
struct NamedTensor {
  const char* name;
  const at::Tensor* tensor;
  NamedTensor(const char* n, const at::Tensor& t) : name(n), tensor(&t) {}
  NamedTensor(const char* n, const std::optional<at::Tensor>& t) : name(n), tensor(t.has_value() ? &*t : nullptr) {}
};

// Every given tensor must be on q's device. Runs before the op's Scope is built from q, so that q on the CPU with
// k on a GPU gets this message rather than the device guard's.
void check_same_device_as_q(const at::Tensor& q, std::initializer_list<NamedTensor> tensors);

// The three ops bound to one backend, in the dispatcher's signatures. `Scope` is built from q before anything
// else runs: a device guard (CUDA), nothing (CPU), or a refusal (a CUDA key in a build without CUDA kernels).
template <const Backend& kBackend, typename Scope>
struct OpsOn {
  using OptTensor = std::optional<at::Tensor>;

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const OptTensor& key_group,
                                                            const OptTensor& bias, const OptTensor& logit_scale,
                                                            double scale, bool causal, const OptTensor& cu_seqlens_q,
                                                            const OptTensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                            int64_t max_seqlen_k, bool return_mass) {
    check_same_device_as_q(q, {{"k", k},
                               {"v", v},
                               {"key_group", key_group},
                               {"bias", bias},
                               {"logit_scale", logit_scale},
                               {"cu_seqlens_q", cu_seqlens_q},
                               {"cu_seqlens_k", cu_seqlens_k}});
    const Scope scope(q, "avar.attention");
    return attention_fwd(kBackend, q, k, v, key_group, bias, logit_scale, scale, causal, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, return_mass);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
      const at::Tensor& dout, const OptTensor& dmass, const OptTensor& dlse, const at::Tensor& q, const at::Tensor& k,
      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const OptTensor& mass,
      const OptTensor& key_group, const OptTensor& bias, const OptTensor& logit_scale, double scale, bool causal,
      const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
      bool need_dbias, bool need_dlogit_scale) {
    check_same_device_as_q(q, {{"dout", dout},
                               {"dmass", dmass},
                               {"dlse", dlse},
                               {"k", k},
                               {"v", v},
                               {"out", out},
                               {"lse", lse},
                               {"mass", mass},
                               {"key_group", key_group},
                               {"bias", bias},
                               {"logit_scale", logit_scale},
                               {"cu_seqlens_q", cu_seqlens_q},
                               {"cu_seqlens_k", cu_seqlens_k}});
    const Scope scope(q, "avar.attention_bwd");
    return attention_bwd(kBackend, dout, dmass, dlse, q, k, v, out, lse, mass, key_group, bias, logit_scale, scale,
                         causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, need_dbias, need_dlogit_scale);
  }

  static at::Tensor key_mass(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                             const at::Tensor& query_weight, const OptTensor& key_group, const OptTensor& bias,
                             const OptTensor& logit_scale, double scale, bool causal, const OptTensor& cu_seqlens_q,
                             const OptTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
    check_same_device_as_q(q, {{"k", k},
                               {"lse", lse},
                               {"query_weight", query_weight},
                               {"key_group", key_group},
                               {"bias", bias},
                               {"logit_scale", logit_scale},
                               {"cu_seqlens_q", cu_seqlens_q},
                               {"cu_seqlens_k", cu_seqlens_k}});
    const Scope scope(q, "avar.attention_key_mass");
    return attention_key_mass(kBackend, q, k, lse, query_weight, key_group, bias, logit_scale, scale, causal,
                              cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  }
};

// CPU ops need no device state.
struct NoScope {
  NoScope(const at::Tensor&, const char*) {}
};

// Registered for the CUDA key when the extension was built without CUDA kernels, so that a CUDA tensor gets
// this explanation instead of the dispatcher's generic "no kernel" error.
struct RefuseWithoutCudaKernels {
  RefuseWithoutCudaKernels(const at::Tensor& q, const char* op);
};

}  // namespace avar
