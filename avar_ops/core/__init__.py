"""Core layer: token-group ids, the fused attention op, its float64 reference, and index selection.

Importing it needs no compiled extension; the extension loads on the first op call (`ensure_loaded`).
Test support (tolerances, poisoning, PyTorch's own low-precision yardstick) is `avar_ops.core.testing`.
"""

from avar_ops.core.constants import GROUP_NAMES, NUM_GROUPS, Group
from avar_ops.core.extension import load_extension
from avar_ops.core.ops import AttentionOutput, attention, attention_key_mass, ensure_loaded
from avar_ops.core.reference import attention_reference, key_mass_reference
from avar_ops.core.selection import select_indices

__all__ = [
    "Group",
    "NUM_GROUPS",
    "GROUP_NAMES",
    "AttentionOutput",
    "attention",
    "attention_key_mass",
    "attention_reference",
    "key_mass_reference",
    "ensure_loaded",
    "load_extension",
    "select_indices",
]
