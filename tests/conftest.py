import pytest
import torch

import avar_ops
from avar_ops.core.testing import poisoned_outputs

# The value checks always run on CPU inputs; on CUDA they run only behind this switch (they wait for the GPU).
avar_ops.set_input_checks(True)


@pytest.fixture(autouse=True)
def _poison_and_seed():
    """Every test starts from a fixed seed, and every avar op output starts as NaN."""
    torch.manual_seed(0)
    with poisoned_outputs():
        yield
