"""Qwen2-VL, Qwen3-VL and Qwen3-VL-MoE: the common layout and Qwen's `<|im_start|>` chat template.

All three are a conditional-generation model whose `.model` holds the vision tower (`.visual`) and the text
decoder (`.language_model.layers[i].self_attn`, every layer softmax attention through transformers' attention
interface), with `<|vision_start|>` + `<|image_pad|>` / `<|video_pad|>` + `<|vision_end|>` inline; they differ
from Qwen2.5-VL only in what the patch does not touch:

- Qwen2-VL: MRoPE with contiguous temporal / height / width frequency sections; no windowed vision blocks.
- Qwen3-VL: interleaved MRoPE; DeepStack adds vision features (from listed vision blocks) to the hidden states
  at the image / video positions after the first decoder layers. It changes the hidden states the later
  layers' queries and keys are computed from, never the sequence or the attention function, so the groups and
  the masses are those of any other forward (tests/test_family_qwen3_vl.py checks the masses against eager
  maps with DeepStack on).
- Qwen3-VL video: the processor ties frames to time in text, expanding each video's pad into, per temporal
  patch, `<T seconds>` then `<|vision_start|>` + the frame's pads + `<|vision_end|>`. The timestamps are plain
  text inside the user turn, so they are **user text (group 3)**, as every non-special token of a user turn's
  body is (docs/design.md §2); the vision markers around each frame are special tokens (group 0) and the pads
  are visual (group 1).
- Qwen3-VL-MoE: Qwen3-VL with sparse mixture-of-experts MLPs; attention is the dense model's.
"""

from avar_ops.hf.families.base import Family

__all__ = ["Qwen2_VL", "Qwen3_VL", "Qwen3_VL_MoE"]


class Qwen2_VL(Family):
    name = "qwen2_vl"
    title = "Qwen2-VL"
    model_types = ("qwen2_vl",)


class Qwen3_VL(Family):
    name = "qwen3_vl"
    title = "Qwen3-VL"
    model_types = ("qwen3_vl",)


class Qwen3_VL_MoE(Family):
    name = "qwen3_vl_moe"
    title = "Qwen3-VL-MoE"
    model_types = ("qwen3_vl_moe",)
