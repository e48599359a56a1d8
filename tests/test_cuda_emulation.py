"""The emulated CUDA device itself (csrc/attention/cuda/emulation.h): its warp instructions compute what the PTX
ISA says, and it fails a launch, with a message, where a GPU would fault, hang or read garbage.

These run against avar_ops._C_emu (AVAR_EXTENSION=cuda_emulation), in scripts/test.sh's second pass.
"""

from __future__ import annotations

import os

import pytest

from avar_ops.core import load_extension

pytestmark = pytest.mark.skipif(
    os.environ.get("AVAR_EXTENSION") != "cuda_emulation",
    reason="tests the emulated device: run with AVAR_EXTENSION=cuda_emulation (scripts/test.sh's second pass)",
)


@pytest.mark.parametrize("name", ["mma", "mma_trans"])
def test_ldmatrix_and_mma_compute_the_product(name):
    # A 16×16 by 16×8 (16) product of exact bf16 values, loaded with the kernels' own ldmatrix patterns.
    assert load_extension().emulation_selftest(name) == ""


@pytest.mark.parametrize(
    "name, message",
    [
        ("deadlock", "deadlock: 32 of 64 threads wait"),
        ("divergent_warp", "different warp instructions"),
        ("misaligned_ldmatrix", "not a 16-byte aligned row"),
        ("too_much_smem", "more than sm_80's"),
        ("early_read", "read before the wait: NaN"),
    ],
)
def test_faults_are_reported(name, message):
    assert message in load_extension().emulation_selftest(name)
