#include "attention_ops.h"

#include <c10/util/irange.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "params.h"
#ifdef AVAR_CUDA_EMULATION
#include "cuda/emulated_device.h"
#endif

namespace avar {

namespace {
std::atomic<bool> g_poison{false};

bool checks_from_env() {
  const char* v = std::getenv("AVAR_CHECK_INPUTS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}
std::atomic<bool> g_input_checks{checks_from_env()};
}  // namespace

void set_poison_outputs(bool on) {
  g_poison.store(on);
}
void set_input_checks(bool on) {
  g_input_checks.store(on);
}
bool input_checks() {
  return g_input_checks.load();
}

const Backend kCpuBackend{&cpu::attention_fwd, &cpu::attention_bwd, &cpu::attention_key_mass};

void check_same_device_as_q(const at::Tensor& q, std::initializer_list<NamedTensor> tensors) {
  for (const NamedTensor& t : tensors) {
    if (t.tensor == nullptr || !t.tensor->defined()) continue;
    TORCH_CHECK_VALUE(t.tensor->device() == q.device(), "avar.attention: ", t.name,
                      " must be on the same device as q (", q.device(), "), got ", t.tensor->device());
  }
}

RefuseWithoutCudaKernels::RefuseWithoutCudaKernels(const at::Tensor& q, const char* op) {
  TORCH_CHECK(false, op, ": q is on ", q.device(),
              " but this build of avar_ops has no CUDA kernels (a CPU-only build: no GPU was visible "
              "at build time, or AVAR_FORCE_CPU=1 was set). Rebuild with them: "
              "AVAR_CUDA_ARCHS=\"8.0;9.0\" pip install --no-build-isolation -e . (list your GPU's compute "
              "capability), or run the build on a machine where the GPU is visible");
}

namespace {

// Under test, outputs start as NaN so that a row a kernel forgets to write cannot pass as zeros.
at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(shape, opts);
  if (g_poison.load() && t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Sizes of one call, for the batched ([B, L, H, D]) or the varlen ([T, H, D] + cu_seqlens) layout.
struct Geometry {
  bool varlen = false;
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0;  // varlen: batch = len(cu) - 1, seqlen = longest sequence
  int64_t total_q = 0, total_k = 0;               // varlen: rows of q and k; batched: B·L
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  int64_t covered_q = 0, covered_k = 0;  // varlen: cu_seqlens_*[-1] (rows past them belong to no sequence)
};

// Whether a call follows the CUDA rules (float16 / bfloat16, head dims 64, 80 and 128, max_seqlen from the
// caller, value checks only when asked for): CUDA inputs, and in an emulation build the CPU inputs that run on
// the emulated device.
bool cuda_rules(const Tensor& q) {
#ifdef AVAR_CUDA_EMULATION
  return q.is_cuda() || runs_on_emulated_device(q.scalar_type());
#else
  return q.is_cuda();
#endif
}

// Value checks read tensor contents; on CUDA that waits for the GPU, so they run there only when asked for.
bool value_checks_for(const Tensor& q) {
  return !cuda_rules(q) || input_checks();
}

// The kernels compute in float32, except the CPU float64 path (gradcheck).
at::ScalarType kernel_float(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

double largest_finite(at::ScalarType t) {
  return t == at::kDouble ? DBL_MAX : FLT_MAX;
}

bool is_supported_dtype(const Tensor& q) {
  const at::ScalarType dt = q.scalar_type();
  if (cuda_rules(q)) return dt == at::kHalf || dt == at::kBFloat16;
  return dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble;
}

void check_same_device(const Tensor& ref, const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "avar.attention: ", name, " must be on the same device as q (",
                    ref.device(), "), got ", t.device());
}

void check_last_dim_contiguous(const Tensor& t, const char* name) {
  // An empty tensor has no layout to speak of (autograd hands zero-stride gradients for empty outputs).
  TORCH_CHECK_VALUE(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, "avar.attention: ", name,
                    " must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

void check_cu_seqlens_form(const Tensor& cu, const Tensor& ref, const char* name) {
  check_same_device(ref, cu, name);
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "avar.attention: ", name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 2, "avar.attention: ", name,
                    " must be 1-D with at least 2 entries (batch + 1), got shape ", cu.sizes());
}

// Reads cu_seqlens to the host and checks its values, so that kernels can trust every offset.
std::vector<int32_t> read_cu_seqlens(const Tensor& cu, const char* name, int64_t total, const char* total_name) {
  const Tensor host = cu.to(at::kCPU).contiguous();
  const int32_t* c = host.data_ptr<int32_t>();
  std::vector<int32_t> vals(c, c + host.numel());
  TORCH_CHECK_VALUE(vals[0] == 0, "avar.attention: ", name, "[0] must be 0, got ", vals[0]);
  for (const auto i : c10::irange<size_t>(1, vals.size())) {
    TORCH_CHECK_VALUE(vals[i] >= vals[i - 1], "avar.attention: ", name, " must be non-decreasing, got ", vals[i - 1],
                      " then ", vals[i], " at index ", i);
  }
  TORCH_CHECK_VALUE(vals.back() <= total, "avar.attention: ", name, "[-1] = ", vals.back(), " is past the ", total,
                    " rows of ", total_name);
  return vals;
}

int64_t longest(const std::vector<int32_t>& cu) {
  int64_t m = 0;
  for (const auto i : c10::irange<size_t>(1, cu.size())) m = std::max<int64_t>(m, cu[i] - cu[i - 1]);
  return m;
}

Geometry check_qkv(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& cu_q, const OptTensor& cu_k,
                   int64_t max_seqlen_q, int64_t max_seqlen_k, bool value_checks) {
  Geometry g;
  TORCH_CHECK_VALUE(cu_q.has_value() == cu_k.has_value(),
                    "avar.attention: cu_seqlens_q and cu_seqlens_k must be given together (varlen), got ",
                    cu_q.has_value() ? "only cu_seqlens_q" : "only cu_seqlens_k");
  g.varlen = cu_q.has_value();
  const int64_t rank = g.varlen ? 3 : 4;
  const char* layout = g.varlen ? "[T, H, D] (varlen)" : "[B, L, H, D]";
  TORCH_CHECK_VALUE(q.dim() == rank, "avar.attention: q must be ", layout, ", got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == rank, "avar.attention: k must be ", layout, ", got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == rank, "avar.attention: v must be ", layout, ", got shape ", v.sizes());
  check_same_device(q, k, "k");
  check_same_device(q, v, "v");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "avar.attention: q, k and v must share one dtype, got q ", q.scalar_type(), ", k ", k.scalar_type(),
                   ", v ", v.scalar_type());
  TORCH_CHECK_TYPE(is_supported_dtype(q), "avar.attention: q dtype ", q.scalar_type(), " is not supported on ",
                   q.device().type(),
                   cuda_rules(q) ? " (expected float16 or bfloat16)" : " (expected float32, bfloat16 or float64)");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "avar.attention: k and v must have the same shape, got k ", k.sizes(),
                    " and v ", v.sizes());
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");

  g.head_dim = q.size(-1);
  g.heads = q.size(-2);
  g.kv_heads = k.size(-2);
  TORCH_CHECK_VALUE(k.size(-1) == g.head_dim, "avar.attention: q and k must have the same head dim, got q ", q.sizes(),
                    " and k ", k.sizes());
  TORCH_CHECK_VALUE(g.kv_heads > 0 && g.heads % g.kv_heads == 0,
                    "avar.attention: the number of query heads must be a multiple of the number of kv heads "
                    "(H % H_kv == 0), got H = ",
                    g.heads, " and H_kv = ", g.kv_heads);
  if (cuda_rules(q)) {
    TORCH_CHECK_VALUE(g.head_dim == 64 || g.head_dim == 80 || g.head_dim == 128, "avar.attention: head dim ",
                      g.head_dim, " is not supported on CUDA (expected 64, 80 or 128)");
  } else {
    TORCH_CHECK_VALUE(g.head_dim >= 1 && g.head_dim <= 256, "avar.attention: head dim ", g.head_dim,
                      " is not supported on the CPU (expected 1..256)");
  }

  if (g.varlen) {
    check_cu_seqlens_form(*cu_q, q, "cu_seqlens_q");
    check_cu_seqlens_form(*cu_k, q, "cu_seqlens_k");
    TORCH_CHECK_VALUE(cu_q->numel() == cu_k->numel(),
                      "avar.attention: cu_seqlens_q and cu_seqlens_k must have the "
                      "same length (batch + 1), got ",
                      cu_q->numel(), " and ", cu_k->numel());
    g.batch = cu_q->numel() - 1;
    g.total_q = q.size(0);
    g.total_k = k.size(0);
    // Negative: not given. CUDA takes them from the caller (as FlashAttention's varlen API does) so that no
    // call waits for the GPU; the CPU reads them off cu_seqlens.
    TORCH_CHECK_VALUE(!cuda_rules(q) || (max_seqlen_q >= 0 && max_seqlen_k >= 0),
                      "avar.attention: varlen on CUDA needs max_seqlen_q and max_seqlen_k (the longest query and "
                      "key sequence): reading them from cu_seqlens would wait for the GPU on every call; got "
                      "max_seqlen_q = ",
                      max_seqlen_q < 0 ? std::string("None") : std::to_string(max_seqlen_q),
                      ", max_seqlen_k = ", max_seqlen_k < 0 ? std::string("None") : std::to_string(max_seqlen_k));
    TORCH_CHECK_VALUE(max_seqlen_q <= g.total_q, "avar.attention: max_seqlen_q = ", max_seqlen_q, " is more than the ",
                      g.total_q, " rows of q");
    TORCH_CHECK_VALUE(max_seqlen_k <= g.total_k, "avar.attention: max_seqlen_k = ", max_seqlen_k, " is more than the ",
                      g.total_k, " rows of k");
    // Without the value checks cu_seqlens stays unread on the GPU: covered_* stay 0, so that every output row
    // starts as "no sequence" (zero, lse −inf) and the kernels overwrite those that belong to one.
    if (value_checks) {
      const auto cq = read_cu_seqlens(*cu_q, "cu_seqlens_q", g.total_q, "q");
      const auto ck = read_cu_seqlens(*cu_k, "cu_seqlens_k", g.total_k, "k");
      g.covered_q = cq.back();
      g.covered_k = ck.back();
      g.seqlen_q = longest(cq);
      g.seqlen_k = longest(ck);
      TORCH_CHECK_VALUE(max_seqlen_q < 0 || max_seqlen_q >= g.seqlen_q, "avar.attention: max_seqlen_q = ", max_seqlen_q,
                        " is smaller than the longest query sequence in cu_seqlens_q (", g.seqlen_q, ")");
      TORCH_CHECK_VALUE(max_seqlen_k < 0 || max_seqlen_k >= g.seqlen_k, "avar.attention: max_seqlen_k = ", max_seqlen_k,
                        " is smaller than the longest key sequence in cu_seqlens_k (", g.seqlen_k, ")");
    }
    if (cuda_rules(q)) {
      g.seqlen_q = max_seqlen_q;
      g.seqlen_k = max_seqlen_k;
    }
  } else {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), "avar.attention: q and k must have the same batch size, got q ",
                      q.sizes(), " and k ", k.sizes());
    g.batch = q.size(0);
    g.seqlen_q = q.size(1);
    g.seqlen_k = k.size(1);
    g.total_q = g.batch * g.seqlen_q;
    g.total_k = g.batch * g.seqlen_k;
    g.covered_q = g.total_q;
    g.covered_k = g.total_k;
  }
  return g;
}

void check_key_group(const Tensor& kg, const Tensor& q, const Geometry& g, bool value_checks) {
  check_same_device(q, kg, "key_group");
  TORCH_CHECK_TYPE(kg.scalar_type() == at::kChar, "avar.attention: key_group must be int8, got ", kg.scalar_type());
  if (g.varlen) {
    TORCH_CHECK_VALUE(kg.dim() == 1 && kg.size(0) == g.total_k, "avar.attention: key_group must be [Tk] = [", g.total_k,
                      "] (one group id per key row), got shape ", kg.sizes());
  } else {
    TORCH_CHECK_VALUE(kg.dim() == 2 && kg.size(0) == g.batch && kg.size(1) == g.seqlen_k,
                      "avar.attention: key_group must be [B, Lk] = [", g.batch, ", ", g.seqlen_k, "], got shape ",
                      kg.sizes());
  }
  if (value_checks && kg.numel() > 0) {
    const auto lo = kg.min().item<int>();
    const auto hi = kg.max().item<int>();
    TORCH_CHECK_VALUE(lo >= -1 && hi < kNumGroups, "avar.attention: key_group values must be in -1..", kNumGroups - 1,
                      " (-1 masked, 0 other text, 1 visual, 2 system, 3 user text), got values in ", lo, "..", hi);
  }
}

// "[h, g]" for an [H, G] table, "[g]" for a shared [G] table: where the i-th entry of the flat table sits.
std::string table_index(const Tensor& t, int64_t i) {
  if (t.dim() == 1) return "[" + std::to_string(i) + "]";
  return "[" + std::to_string(i / kNumGroups) + ", " + std::to_string(i % kNumGroups) + "]";
}

// Every entry must be finite once cast to the kernel's type, and stay finite once scaled into the log2 domain
// the kernels work in (logit_scale also times scale): a value that overflows there would make rows dead or NaN.
void check_table_values(const Tensor& x, const char* name, bool is_logit_scale, double scale, at::ScalarType kt) {
  const Tensor host = x.to(kt).to(at::kCPU, at::kDouble).contiguous().reshape({-1});  // [H·G] or [G]
  const double* v = host.data_ptr<double>();
  const double limit = largest_finite(kt);
  const double log2e = 1.4426950408889634;
  const char* type_name = kt == at::kDouble ? "float64" : "float32";
  for (const auto i : c10::irange(host.numel())) {
    TORCH_CHECK_VALUE(std::isfinite(v[i]), "avar.attention: ", name, " must be finite in ", type_name, ", got ", v[i],
                      " at ", name, table_index(x, i));
    const double factor = is_logit_scale ? scale * log2e : log2e;
    TORCH_CHECK_VALUE(std::abs(v[i] * factor) <= limit, "avar.attention: ", name, table_index(x, i), " = ", v[i],
                      is_logit_scale ? " times scale = " + std::to_string(scale) : std::string(), " overflows ",
                      type_name, " in the kernels (|", is_logit_scale ? "scale · " : "", name,
                      " · log2(e)| must stay below ", limit, ")");
  }
}

// A [H, G] or [G] table, returned as a contiguous [H, G] tensor of `dtype`; `fill` when absent. float32, or
// float64 with float64 inputs (so gradcheck can perturb it without float32 rounding).
Tensor check_group_table(const OptTensor& t, const Tensor& q, int64_t heads, const char* name, float fill,
                         at::ScalarType dtype) {
  if (!t.has_value()) return at::full({heads, kNumGroups}, fill, q.options().dtype(dtype));
  const Tensor& x = *t;
  check_same_device(q, x, name);
  const bool fp64_ok = q.scalar_type() == at::kDouble && x.scalar_type() == at::kDouble;
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || fp64_ok, "avar.attention: ", name, " must be float32",
                   q.scalar_type() == at::kDouble ? " or float64" : "", ", got ", x.scalar_type());
  const bool per_head = x.dim() == 2 && x.size(0) == heads && x.size(1) == kNumGroups;
  const bool shared = x.dim() == 1 && x.size(0) == kNumGroups;
  TORCH_CHECK_VALUE(per_head || shared, "avar.attention: ", name, " must be [H, G] = [", heads, ", ", kNumGroups,
                    "] or [G] = [", kNumGroups, "], got shape ", x.sizes());
  return (shared ? x.unsqueeze(0).expand({heads, kNumGroups}) : x).to(dtype).contiguous();
}

void check_scale(double scale, at::ScalarType kt) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "avar.attention: scale must be finite, got ", scale);
  const double limit = largest_finite(kt);
  TORCH_CHECK_VALUE(std::abs(scale * 1.4426950408889634) <= limit, "avar.attention: scale = ", scale, " overflows ",
                    kt == at::kDouble ? "float64" : "float32", " in the kernels (|scale · log2(e)| must stay below ",
                    limit, ")");
}

// Row strides of a [B, L, H, D] / [T, H, D] tensor in the unified (batch, row, head) addressing.
struct Strides3 {
  int64_t batch, row, head;
};

Strides3 bshd_strides(const Tensor& t, bool varlen) {
  if (varlen) return {0, t.stride(0), t.stride(1)};
  return {t.stride(0), t.stride(1), t.stride(2)};
}

// lse-like [B, H, L] / [H, T] and mass-like [B, H, L, G] / [H, T, G]: (batch, row, head) strides.
Strides3 bhl_strides(const Tensor& t, bool varlen) {
  if (varlen) return {0, t.stride(1), t.stride(0)};
  return {t.stride(0), t.stride(2), t.stride(1)};
}

SeqLayout make_layout(const Geometry& g, const OptTensor& cu_q, const OptTensor& cu_k, double scale, bool causal) {
  SeqLayout s;
  s.cu_seqlens_q = g.varlen ? cu_q->data_ptr<int32_t>() : nullptr;
  s.cu_seqlens_k = g.varlen ? cu_k->data_ptr<int32_t>() : nullptr;
  s.batch = g.batch;
  s.seqlen_q = g.seqlen_q;
  s.seqlen_k = g.seqlen_k;
  s.total_q = g.total_q;
  s.total_k = g.total_k;
  s.heads = g.heads;
  s.kv_heads = g.kv_heads;
  s.head_dim = g.head_dim;
  s.causal = causal;
  s.scale = scale;
  return s;
}

// Everything the forward reads (not out/lse/mass), checked and laid into Params.
struct PreparedInputs {
  Geometry geo;
  Tensor bias, logit_scale;          // [H, G] float32 contiguous
  Tensor bias_f64, logit_scale_f64;  // [H, G] float64 contiguous, float64 inputs only
  OptTensor cu_q, cu_k;              // contiguous int32
  AttnFwdParams params;
};

PreparedInputs prepare_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& key_group,
                              const OptTensor& bias, const OptTensor& logit_scale, double scale, bool causal,
                              const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, int64_t max_seqlen_q,
                              int64_t max_seqlen_k) {
  PreparedInputs in;
  const bool value_checks = value_checks_for(q);
  in.geo = check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, value_checks);
  const Geometry& g = in.geo;
  check_scale(scale, kernel_float(q));
  if (key_group.has_value()) check_key_group(*key_group, q, g, value_checks);
  in.bias = check_group_table(bias, q, g.heads, "bias", 0.f, at::kFloat);
  in.logit_scale = check_group_table(logit_scale, q, g.heads, "logit_scale", 1.f, at::kFloat);
  if (q.scalar_type() == at::kDouble) {
    in.bias_f64 = check_group_table(bias, q, g.heads, "bias", 0.f, at::kDouble);
    in.logit_scale_f64 = check_group_table(logit_scale, q, g.heads, "logit_scale", 1.f, at::kDouble);
  }
  if (value_checks && bias.has_value()) check_table_values(*bias, "bias", false, scale, kernel_float(q));
  if (value_checks && logit_scale.has_value()) {
    check_table_values(*logit_scale, "logit_scale", true, scale, kernel_float(q));
  }
  if (g.varlen) {
    in.cu_q = cu_seqlens_q->contiguous();
    in.cu_k = cu_seqlens_k->contiguous();
  }

  AttnFwdParams& p = in.params;
  p.seq = make_layout(g, in.cu_q, in.cu_k, scale, causal);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  const auto sq = bshd_strides(q, g.varlen), sk = bshd_strides(k, g.varlen), sv = bshd_strides(v, g.varlen);
  p.q_batch_stride = sq.batch, p.q_row_stride = sq.row, p.q_head_stride = sq.head;
  p.k_batch_stride = sk.batch, p.k_row_stride = sk.row, p.k_head_stride = sk.head;
  p.v_batch_stride = sv.batch, p.v_row_stride = sv.row, p.v_head_stride = sv.head;
  if (key_group.has_value()) {
    p.key_group = key_group->data_ptr<int8_t>();
    p.kg_batch_stride = g.varlen ? 0 : key_group->stride(0);
    p.kg_row_stride = key_group->stride(-1);
  }
  p.bias = in.bias.data_ptr<float>();
  p.logit_scale = in.logit_scale.data_ptr<float>();
  if (q.scalar_type() == at::kDouble) {
    p.bias_f64 = in.bias_f64.data_ptr<double>();
    p.logit_scale_f64 = in.logit_scale_f64.data_ptr<double>();
  }
  return in;
}

void set_lse(AttnFwdParams& p, const Tensor& lse, bool varlen) {
  const auto s = bhl_strides(lse, varlen);
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = s.batch, p.lse_row_stride = s.row, p.lse_head_stride = s.head;
}

void set_mass(AttnFwdParams& p, const Tensor& mass, bool varlen) {
  const auto s = bhl_strides(mass, varlen);
  p.mass = mass.data_ptr<float>();
  p.mass_batch_stride = s.batch, p.mass_row_stride = s.row, p.mass_head_stride = s.head;
}

std::vector<int64_t> lse_shape(const Geometry& g) {
  if (g.varlen) return {g.heads, g.total_q};
  return {g.batch, g.heads, g.seqlen_q};
}

std::vector<int64_t> mass_shape(const Geometry& g) {
  auto s = lse_shape(g);
  s.push_back(kNumGroups);
  return s;
}

void check_like(const Tensor& t, at::IntArrayRef shape, at::ScalarType dtype, const Tensor& q, const char* name,
                const char* what) {
  check_same_device(q, t, name);
  TORCH_CHECK_VALUE(t.sizes() == shape, "avar.attention_bwd: ", name, " must have shape ", shape, " (", what, "), got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "avar.attention_bwd: ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  check_last_dim_contiguous(t, name);
}

#ifdef AVAR_CUDA_EMULATION
// The emulated device checks every global access of the kernels against the memory of the tensors they were
// handed: each tensor's elements from the first to the last in memory (undefined or empty tensors add nothing).
void add_buffers(cuda_emulation::BufferScope& scope,
                 std::initializer_list<std::pair<const char*, const Tensor*>> tensors) {
  for (const auto& [name, t] : tensors) {
    if (t == nullptr || !t->defined() || t->numel() == 0) continue;
    int64_t last = 0;
    for (int64_t d = 0; d < t->dim(); ++d) last += (t->size(d) - 1) * t->stride(d);
    scope.add(name, t->data_ptr(), static_cast<size_t>((last + 1) * t->element_size()));
  }
}

const Tensor* opt(const OptTensor& t) {
  return t.has_value() ? &*t : nullptr;
}
#endif

}  // namespace

std::tuple<Tensor, Tensor, Tensor> attention_fwd(const Backend& backend, const Tensor& q, const Tensor& k,
                                                 const Tensor& v, const OptTensor& key_group, const OptTensor& bias,
                                                 const OptTensor& logit_scale, double scale, bool causal,
                                                 const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k,
                                                 int64_t max_seqlen_q, int64_t max_seqlen_k, bool return_mass) {
  PreparedInputs in = prepare_inputs(q, k, v, key_group, bias, logit_scale, scale, causal, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k);
  const Geometry& g = in.geo;
  AttnFwdParams& p = in.params;

  Tensor out = new_output(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = new_output(lse_shape(g), q.options().dtype(at::kFloat));
  Tensor mass = return_mass ? new_output(mass_shape(g), q.options().dtype(at::kFloat))
                            : at::empty({0}, q.options().dtype(at::kFloat));
  if (g.covered_q < g.total_q) {
    // varlen rows past cu_seqlens_q[-1] belong to no sequence: they attend to nothing.
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    if (return_mass) mass.zero_();
  }
  const auto so = bshd_strides(out, g.varlen);
  p.out = out.data_ptr();
  p.o_batch_stride = so.batch, p.o_row_stride = so.row, p.o_head_stride = so.head;
  set_lse(p, lse, g.varlen);
  if (return_mass) set_mass(p, mass, g.varlen);

  if (q.numel() == 0) return {out, lse, mass};
#ifdef AVAR_CUDA_EMULATION
  cuda_emulation::BufferScope buffers;
  add_buffers(buffers, {{"q", &q},
                        {"k", &k},
                        {"v", &v},
                        {"key_group", opt(key_group)},
                        {"bias", &in.bias},
                        {"logit_scale", &in.logit_scale},
                        {"cu_seqlens_q", opt(in.cu_q)},
                        {"cu_seqlens_k", opt(in.cu_k)},
                        {"out", &out},
                        {"lse", &lse},
                        {"mass", &mass}});
#endif
  backend.fwd(p, q.scalar_type());
  return {out, lse, mass};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_bwd(
    const Backend& backend, const Tensor& dout, const OptTensor& dmass, const OptTensor& dlse, const Tensor& q,
    const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse, const OptTensor& mass,
    const OptTensor& key_group, const OptTensor& bias, const OptTensor& logit_scale, double scale, bool causal,
    const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    bool need_dbias, bool need_dlogit_scale) {
  PreparedInputs in = prepare_inputs(q, k, v, key_group, bias, logit_scale, scale, causal, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k);
  const Geometry& g = in.geo;
  check_like(out, q.sizes(), q.scalar_type(), q, "out", "the forward's output, like q");
  check_like(dout, q.sizes(), q.scalar_type(), q, "dout", "the gradient of out, like q");
  const auto lshape = lse_shape(g), mshape = mass_shape(g);
  check_like(lse, lshape, at::kFloat, q, "lse", "the forward's log-sum-exp");
  TORCH_CHECK_VALUE(!dmass.has_value() || mass.has_value(),
                    "avar.attention_bwd: dmass was given without mass (the forward's masses are needed for D)");
  if (mass.has_value()) check_like(*mass, mshape, at::kFloat, q, "mass", "the forward's masses");
  if (dmass.has_value()) check_like(*dmass, mshape, at::kFloat, q, "dmass", "the gradient of mass");
  if (dlse.has_value()) check_like(*dlse, lshape, at::kFloat, q, "dlse", "the gradient of lse");

  AttnBwdParams bp;
  bp.fwd = in.params;
  AttnFwdParams& p = bp.fwd;
  const auto so = bshd_strides(out, g.varlen);
  p.out = const_cast<void*>(out.data_ptr());
  p.o_batch_stride = so.batch, p.o_row_stride = so.row, p.o_head_stride = so.head;
  set_lse(p, lse, g.varlen);
  if (mass.has_value()) set_mass(p, *mass, g.varlen);

  const auto sdo = bshd_strides(dout, g.varlen);
  bp.dout = dout.data_ptr();
  bp.do_batch_stride = sdo.batch, bp.do_row_stride = sdo.row, bp.do_head_stride = sdo.head;
  if (dmass.has_value()) {
    const auto s = bhl_strides(*dmass, g.varlen);
    bp.dmass = dmass->data_ptr<float>();
    bp.dmass_batch_stride = s.batch, bp.dmass_row_stride = s.row, bp.dmass_head_stride = s.head;
  }
  if (dlse.has_value()) {
    const auto s = bhl_strides(*dlse, g.varlen);
    bp.dlse = dlse->data_ptr<float>();
    bp.dlse_batch_stride = s.batch, bp.dlse_row_stride = s.row, bp.dlse_head_stride = s.head;
  }

  // Kernels write every row of every sequence; varlen rows past the last sequence get no gradient.
  const auto alloc = [](const Tensor& like, bool zero) {
    return zero ? at::zeros(like.sizes(), like.options()) : new_output(like.sizes(), like.options());
  };
  Tensor dq = alloc(q, g.covered_q < g.total_q);
  Tensor dk = alloc(k, g.covered_k < g.total_k);
  Tensor dv = alloc(v, g.covered_k < g.total_k);
  const auto sdq = bshd_strides(dq, g.varlen), sdk = bshd_strides(dk, g.varlen), sdv = bshd_strides(dv, g.varlen);
  bp.dq = dq.data_ptr();
  bp.dk = dk.data_ptr();
  bp.dv = dv.data_ptr();
  bp.dq_batch_stride = sdq.batch, bp.dq_row_stride = sdq.row, bp.dq_head_stride = sdq.head;
  bp.dk_batch_stride = sdk.batch, bp.dk_row_stride = sdk.row, bp.dk_head_stride = sdk.head;
  bp.dv_batch_stride = sdv.batch, bp.dv_row_stride = sdv.row, bp.dv_head_stride = sdv.head;

  const auto table = q.options().dtype(at::kFloat);
  Tensor dbias = need_dbias ? at::zeros({g.heads, kNumGroups}, table) : at::empty({0}, table);
  Tensor dlogit = need_dlogit_scale ? at::zeros({g.heads, kNumGroups}, table) : at::empty({0}, table);
  bp.dbias = need_dbias ? dbias.data_ptr<float>() : nullptr;
  bp.dlogit_scale = need_dlogit_scale ? dlogit.data_ptr<float>() : nullptr;

  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dbias, dlogit};
  }
#ifdef AVAR_CUDA_EMULATION
  cuda_emulation::BufferScope buffers;
  add_buffers(buffers, {{"q", &q},
                        {"k", &k},
                        {"v", &v},
                        {"key_group", opt(key_group)},
                        {"bias", &in.bias},
                        {"logit_scale", &in.logit_scale},
                        {"cu_seqlens_q", opt(in.cu_q)},
                        {"cu_seqlens_k", opt(in.cu_k)},
                        {"out", &out},
                        {"lse", &lse},
                        {"mass", opt(mass)},
                        {"dout", &dout},
                        {"dmass", opt(dmass)},
                        {"dlse", opt(dlse)},
                        {"dq", &dq},
                        {"dk", &dk},
                        {"dv", &dv},
                        {"dbias", &dbias},
                        {"dlogit_scale", &dlogit}});
#endif
  backend.bwd(bp, q.scalar_type());
  return {dq, dk, dv, dbias, dlogit};
}

Tensor attention_key_mass(const Backend& backend, const Tensor& q, const Tensor& k, const Tensor& lse,
                          const Tensor& query_weight, const OptTensor& key_group, const OptTensor& bias,
                          const OptTensor& logit_scale, double scale, bool causal, const OptTensor& cu_seqlens_q,
                          const OptTensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  // v is not read; k stands in for it so that the shared checks apply.
  PreparedInputs in = prepare_inputs(q, k, k, key_group, bias, logit_scale, scale, causal, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k);
  const Geometry& g = in.geo;
  const auto lshape = lse_shape(g);
  check_same_device(q, lse, "lse");
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lshape), "avar.attention_key_mass: lse must have shape ",
                    at::IntArrayRef(lshape), " (the forward's log-sum-exp), got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "avar.attention_key_mass: lse must be float32, got ",
                   lse.scalar_type());

  check_same_device(q, query_weight, "query_weight");
  TORCH_CHECK_TYPE(query_weight.scalar_type() == at::kFloat,
                   "avar.attention_key_mass: query_weight must be float32, got ", query_weight.scalar_type());
  KeyMassParams kp;
  kp.fwd = in.params;
  set_lse(kp.fwd, lse, g.varlen);
  const Tensor w = query_weight;
  if (g.varlen) {
    const bool per_head = w.dim() == 2 && w.size(0) == g.heads && w.size(1) == g.total_q;
    const bool shared = w.dim() == 1 && w.size(0) == g.total_q;
    TORCH_CHECK_VALUE(per_head || shared, "avar.attention_key_mass: query_weight must be [H, Tq] = [", g.heads, ", ",
                      g.total_q, "] or [Tq] = [", g.total_q, "], got shape ", w.sizes());
    kp.w_batch_stride = 0;
    kp.w_row_stride = w.stride(-1);
    kp.w_head_stride = per_head ? w.stride(0) : 0;
  } else {
    const bool per_head = w.dim() == 3 && w.size(0) == g.batch && w.size(1) == g.heads && w.size(2) == g.seqlen_q;
    const bool shared = w.dim() == 2 && w.size(0) == g.batch && w.size(1) == g.seqlen_q;
    TORCH_CHECK_VALUE(per_head || shared, "avar.attention_key_mass: query_weight must be [B, H, Lq] = [", g.batch, ", ",
                      g.heads, ", ", g.seqlen_q, "] or [B, Lq] = [", g.batch, ", ", g.seqlen_q, "], got shape ",
                      w.sizes());
    kp.w_batch_stride = w.stride(0);
    kp.w_row_stride = w.stride(-1);
    kp.w_head_stride = per_head ? w.stride(1) : 0;
  }
  kp.query_weight = w.data_ptr<float>();

  const std::vector<int64_t> kshape =
      g.varlen ? std::vector<int64_t>{g.heads, g.total_k} : std::vector<int64_t>{g.batch, g.heads, g.seqlen_k};
  Tensor key_mass = at::zeros(kshape, q.options().dtype(at::kFloat));
  const auto s = bhl_strides(key_mass, g.varlen);
  kp.key_mass = key_mass.data_ptr<float>();
  kp.km_batch_stride = s.batch, kp.km_row_stride = s.row, kp.km_head_stride = s.head;

  if (q.numel() == 0 || k.numel() == 0) return key_mass;
#ifdef AVAR_CUDA_EMULATION
  cuda_emulation::BufferScope buffers;
  add_buffers(buffers, {{"q", &q},
                        {"k", &k},
                        {"key_group", opt(key_group)},
                        {"bias", &in.bias},
                        {"logit_scale", &in.logit_scale},
                        {"cu_seqlens_q", opt(in.cu_q)},
                        {"cu_seqlens_k", opt(in.cu_k)},
                        {"lse", &lse},
                        {"query_weight", &w},
                        {"key_mass", &key_mass}});
#endif
  backend.key_mass(kp, q.scalar_type());
  return key_mass;
}

}  // namespace avar
