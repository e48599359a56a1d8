"""avar: attention-guided multimodal reasoning at FlashAttention cost.

`attention` is fused causal GQA attention with a per-(head, token-group) logit scale and bias that also
returns the attention mass each query puts on each token group (other text, visual, system, user text).
"""

from avar_ops.ops import NUM_GROUPS, AttentionOutput, attention, attention_key_mass, input_checks, set_input_checks
from avar_ops.reference import attention_reference, key_mass_reference

GROUP_MASKED, GROUP_OTHER, GROUP_VISUAL, GROUP_SYSTEM, GROUP_USER = -1, 0, 1, 2, 3

__all__ = [
    "NUM_GROUPS",
    "AttentionOutput",
    "attention",
    "attention_key_mass",
    "attention_reference",
    "key_mass_reference",
    "set_input_checks",
    "input_checks",
    "GROUP_MASKED",
    "GROUP_OTHER",
    "GROUP_VISUAL",
    "GROUP_SYSTEM",
    "GROUP_USER",
]

__version__ = "0.1.0"
