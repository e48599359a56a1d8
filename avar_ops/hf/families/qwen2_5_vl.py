"""Qwen2.5-VL: MRoPE text decoder, `<|im_start|>` turns, `<|vision_start|><|image_pad|>…<|vision_end|>` images."""

from avar_ops.hf.families.base import Family


class Qwen2_5_VL(Family):
    name = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    model_types = ("qwen2_5_vl",)
