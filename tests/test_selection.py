"""The one rule for layer and head selection (avar_ops.core.select_indices), used by every caller."""

import numpy as np
import pytest
import torch

from avar_ops.core import select_indices


@pytest.mark.parametrize(
    "selection, expected",
    [
        (None, None),
        (2, [2]),
        (-1, [3]),
        ([3, 0, 3], [0, 3]),
        ((-4, -1), [0, 3]),
        (range(2), [0, 1]),
        ([np.int64(1), torch.tensor(2)], [1, 2]),
    ],
)
def test_valid_selections(selection, expected):
    assert select_indices(selection, 4, "layers") == expected


@pytest.mark.parametrize(
    "selection, error, match",
    [
        ("01", TypeError, "layers: expected None, an int or a sequence of ints, got the string '01'"),
        ([0, "1"], TypeError, "layers: expected ints, got '1'"),
        ([True], TypeError, "layers: expected ints, got True"),
        ([0.5], TypeError, "layers: expected ints, got 0.5"),
        (4, ValueError, "layers: index 4 is out of range for 4 \\(valid: -4 to 3\\)"),
        ([-5], ValueError, "layers: index -5 is out of range for 4"),
        ([], ValueError, "layers: expected at least one index"),
        (3.0, TypeError, "layers: expected None, an int or a sequence of ints, got float"),
    ],
)
def test_invalid_selections_name_the_argument(selection, error, match):
    with pytest.raises(error, match=match):
        select_indices(selection, 4, "layers")


def test_the_same_rule_everywhere():
    """The patch, the intervention and the VAS measurement accept and refuse the same selections."""
    from avar_ops.method import Intervention

    assert Intervention(alpha_img=0.1, layers=(-1,)).tables(3, 2).layers == (2,)
    with pytest.raises(TypeError, match="string"):
        Intervention(alpha_img=0.1, layers="01").tables(3, 2)
