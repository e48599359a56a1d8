"""avar: attention-guided multimodal reasoning at FlashAttention cost.

`attention` is fused causal GQA attention with a per-(head, token-group) logit scale and bias that also
returns the attention mass each query puts on each token group (other text, visual, system, user text).

Rooms, in layers (each imports only the public names of rooms below it; docs/design.md, section 7):
    avar_ops.core      groups, the op, its reference, index selection
    avar_ops.hf        Hugging Face integration: token groups, the Qwen2.5-VL patch, mass and q/k capture
    avar_ops.method    metrics (VAS, AGTO, VARS) and the intervention
    avar_ops.data      samples and training records, image loading, the text check, path sanitising
    avar_ops.grading   answer extraction and checking, the chat client
    avar_ops.analysis  VAS measurement, heatmaps, plots, the demo, the tiny model
    avar_ops.eval      the benchmark suite
    avar_ops.cli       the `avar` command
"""

from importlib.metadata import PackageNotFoundError, version

from avar_ops.core import (
    GROUP_NAMES,
    NUM_GROUPS,
    AttentionOutput,
    Group,
    attention,
    attention_key_mass,
    attention_reference,
    input_checks,
    key_mass_reference,
    set_input_checks,
)

try:
    __version__ = version("avar")
except PackageNotFoundError:  # a source tree used without installing it
    __version__ = "0+unknown"

__all__ = [
    "Group",
    "NUM_GROUPS",
    "GROUP_NAMES",
    "AttentionOutput",
    "attention",
    "attention_key_mass",
    "attention_reference",
    "key_mass_reference",
    "set_input_checks",
    "input_checks",
]
