import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from avar_ops.testing import poisoned_outputs  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_and_seed():
    """Every test starts from a fixed seed, and every avar op output starts as NaN."""
    torch.manual_seed(0)
    with poisoned_outputs():
        yield
