// Self-tests of the emulated device, for tests/test_cuda_emulation.py (avar_ops._C_emu only).
#pragma once

#include <string>

namespace avar::cuda {

// Runs the named self-test kernel: "mma" and "mma_trans" check ldmatrix + mma.sync against a plain product and
// return "" when they agree; "deadlock", "divergent_warp", "misaligned_ldmatrix" and "too_much_smem" return the
// emulation's error message; "early_read" says what a tile read before its cp.async wait held.
std::string emulation_selftest(const std::string& name);

}  // namespace avar::cuda
