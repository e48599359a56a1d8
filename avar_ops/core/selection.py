"""One rule for choosing layers or heads by index, used by the patch, the metrics, the tools and the CLI.

An index i of n items is valid when −n ≤ i < n; a negative one counts from the end (−1 is the last). None
means all. A single int is one index. Strings (even "01"), bools, floats, an empty selection and out-of-range
indices are refused with a message naming the argument. The result is sorted and free of duplicates.
"""

from __future__ import annotations

import operator
from typing import Iterable, List, Optional, Union

__all__ = ["select_indices"]

Selection = Union[None, int, Iterable[int]]


def select_indices(selection: Selection, count: int, name: str = "layers") -> Optional[List[int]]:
    """The indices in [0, count) that `selection` names, or None when it is None (all of them)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{name}: the number of items must be a non-negative int, got {count!r}")
    if selection is None:
        return None
    if isinstance(selection, (str, bytes)):
        raise TypeError(f"{name}: expected None, an int or a sequence of ints, got the string {selection!r}")
    items = [selection] if isinstance(selection, int) and not isinstance(selection, bool) else selection
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"{name}: expected None, an int or a sequence of ints, got {type(selection).__name__}"
        ) from None
    out = []
    for i in items:
        try:
            if isinstance(i, bool):
                raise TypeError
            i = operator.index(i)  # ints and integer scalars of numpy / torch; floats and strings are refused
        except TypeError:
            raise TypeError(f"{name}: expected ints, got {i!r} ({type(i).__name__})") from None
        if not -count <= i < count:
            raise ValueError(f"{name}: index {i} is out of range for {count} (valid: {-count} to {count - 1})")
        out.append(i + count if i < 0 else i)
    if not out:
        raise ValueError(f"{name}: expected at least one index, or None for all {count}; got an empty selection")
    return sorted(set(out))
