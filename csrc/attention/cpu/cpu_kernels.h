// Entry points of the CPU kernels. Inputs are validated and Params filled by attention_ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include "../params.h"

namespace avar::cpu {

// Writes out, lse and (when p.mass is set) mass.
void attention_fwd(const AttnFwdParams& p, at::ScalarType dtype);

// The decode path of attention_fwd (decode.cpp): every sequence has at most this many queries.
constexpr int64_t kDecodeMaxQueries = 4;
bool decode_applies(const AttnFwdParams& p, at::ScalarType dtype);
void attention_fwd_decode(const AttnFwdParams& p, at::ScalarType dtype);

// Writes dq, dk, dv and (when set) dbias, dlogit_scale.
void attention_bwd(const AttnBwdParams& p, at::ScalarType dtype);

// Writes key_mass[b, h, j] = Σ_i w[b, h, i] · P[b, h, i, j].
void attention_key_mass(const KeyMassParams& p, at::ScalarType dtype);

}  // namespace avar::cpu
