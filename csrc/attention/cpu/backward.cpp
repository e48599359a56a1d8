#include "cpu_kernels.h"

namespace avar::cpu {

void attention_bwd(const AttnBwdParams&, at::ScalarType) {
  TORCH_CHECK(false, "avar: the CPU backward is being written");
}

void attention_key_mass(const KeyMassParams&, at::ScalarType) {
  TORCH_CHECK(false, "avar: the CPU key mass is being written");
}

}  // namespace avar::cpu
