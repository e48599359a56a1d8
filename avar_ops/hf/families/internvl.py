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

    def check_model(self, model, text_model) -> None:
        backbone = getattr(text_model.config, "model_type", None)
        if backbone not in BACKBONES:
            raise NotImplementedError(
                f"avar patch: {self.title} with a {backbone!r} language model is not supported (checked: "
                f"{', '.join(BACKBONES)})"
            )
        super().check_model(model, text_model)
