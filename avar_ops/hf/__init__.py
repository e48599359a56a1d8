"""Hugging Face integration: token groups from the chat template, the Qwen2.5-VL patch and steering files.

The only layer that knows transformers internals. The patch routes the text decoder's attention through the
core op; `collect_masses` gathers the per-group masses of every layer, `capture_attention` the q, k and lse of
chosen layers (for per-key maps), and `patched` scopes a patch to a block.
"""

from avar_ops.hf.patch import (
    SUPPORTED_TRANSFORMERS,
    AttentionCapture,
    LayerInputs,
    MassRecord,
    PatchHandle,
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
from avar_ops.hf.token_groups import TemplateTokens, TokenGroups, template_tokens, token_groups

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "MAX_STEERING_VALUE",
    "AttentionCapture",
    "LayerInputs",
    "MassRecord",
    "PatchHandle",
    "Steering",
    "SteeringError",
    "TemplateTokens",
    "TokenGroups",
    "apply_to_qwen2_5_vl",
    "capture_attention",
    "collect_masses",
    "get_handle",
    "is_patched",
    "load_steering",
    "model_steering_shape",
    "patched",
    "revert",
    "save_steering",
    "template_tokens",
    "token_groups",
]
