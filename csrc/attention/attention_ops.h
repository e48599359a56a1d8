// The avar attention ops as the dispatcher sees them: argument checks, output allocation, Params, and the
// choice of the CPU or CUDA kernel. Schemas are in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace avar {

// Tests turn this on: every output buffer is filled with NaN before a kernel writes it.
void set_poison_outputs(bool on);

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& key_group,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& logit_scale, double scale, bool causal,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool return_mass);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const std::optional<at::Tensor>& dmass, const std::optional<at::Tensor>& dlse,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& mass, const std::optional<at::Tensor>& key_group,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& logit_scale, double scale, bool causal,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool need_dbias, bool need_dlogit_scale);

at::Tensor attention_key_mass(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                              const at::Tensor& query_weight, const std::optional<at::Tensor>& key_group,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& logit_scale,
                              double scale, bool causal, const std::optional<at::Tensor>& cu_seqlens_q,
                              const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                              int64_t max_seqlen_k);

}  // namespace avar
