"""LLaVA-OneVision: SigLIP tower, AnyRes tiles and image-newline vectors, all written `<image>`; a Qwen2 decoder
with 1D RoPE; `<|im_start|>` turns."""

from avar_ops.hf.families.base import Family

# Language models this family is checked with (tests/test_families.py on the tiny model); another backbone may
# route its attention differently (sinks, sliding windows) and is refused until it is checked.
BACKBONES = ("qwen2",)


class LlavaOnevision(Family):
    name = "llava_onevision"
    title = "LLaVA-OneVision"
    model_types = ("llava_onevision",)
    backbones = BACKBONES
