"""Hugging Face integration: token groups from the chat template, the patch for every supported family, and
steering files.

The only layer that knows transformers internals. The patch routes the text decoder's attention through the
core op; `collect_masses` gathers the per-group masses of every layer, `capture_attention` the q, k and lse of
chosen layers (for per-key maps), and `patched` scopes a patch to a block.
"""

from avar_ops.hf.chat_template import render_chat
from avar_ops.hf.families import (
    Family,
    attention_layer_indices,
    family_of,
    get_family,
    load_pretrained,
    supported_families,
)
from avar_ops.hf.patch import (
    SUPPORTED_TRANSFORMERS,
    AttentionCapture,
    LayerInputs,
    MassRecord,
    PatchHandle,
    apply,
    apply_to_qwen2_5_vl,
    capture_attention,
    collect_masses,
    get_handle,
    is_patched,
    patched,
    revert,
)
from avar_ops.hf.steering import (
    MAX_STEERING_VALUE,
    Steering,
    SteeringError,
    load_steering,
    model_steering_shape,
    save_steering,
)
from avar_ops.hf.token_groups import TemplateError, TemplateTokens, TokenGroups, template_tokens, token_groups

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "MAX_STEERING_VALUE",
    "AttentionCapture",
    "Family",
    "LayerInputs",
    "MassRecord",
    "PatchHandle",
    "TemplateError",
    "Steering",
    "SteeringError",
    "TemplateTokens",
    "TokenGroups",
    "apply",
    "apply_to_qwen2_5_vl",
    "attention_layer_indices",
    "capture_attention",
    "collect_masses",
    "family_of",
    "get_family",
    "get_handle",
    "is_patched",
    "load_pretrained",
    "patched",
    "render_chat",
    "revert",
    "supported_families",
    "load_steering",
    "model_steering_shape",
    "save_steering",
    "template_tokens",
    "token_groups",
]
