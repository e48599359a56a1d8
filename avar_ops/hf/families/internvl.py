"""InternVL (transformers' native class): InternViT tiles, pixel shuffle, `<img>` + `<IMG_CONTEXT>`… + `</img>`
per image (video frames too); a Qwen2 (InternVL3) or Qwen3 (InternVL3.5) decoder with 1D RoPE; `<|im_start|>`
turns. The image-context token is the only placeholder the model fills (`config.image_token_id`)."""

from avar_ops.hf.families.base import Family

# Language models this family is checked with (tests/test_families.py, tests/test_family_llava_internvl.py);
# others (GPT-OSS with attention sinks and sliding windows, ...) are refused until they are checked.
BACKBONES = ("qwen2", "qwen3")


class InternVL(Family):
    name = "internvl"
    title = "InternVL"
    model_types = ("internvl",)
    backbones = BACKBONES
