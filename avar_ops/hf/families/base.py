"""The adapter contract: what the patch needs to know about one model family.

A family module subclasses `Family`, names the model types it serves and overrides only what differs from the
common layout (a conditional-generation model whose `.model` is the multimodal base, whose `.language_model` is the
text decoder with `.layers[i].self_attn`). The patch itself (`avar_ops.hf.patch`) is family-free: it hooks the
base model's forward, switches the text config's attention implementation and reads the groups from the chat
template (`avar_ops.hf.chat_template`).
"""

from __future__ import annotations

from typing import List, Tuple

from torch import nn

__all__ = ["Family"]

# Decoder layer types whose attention is not softmax attention over the whole causal prefix: they keep their
# own implementation and have no masses (Qwen3.5's Gated DeltaNet layers).
LINEAR_LAYER_TYPES = ("linear_attention",)


class Family:
    """One model family. Subclasses set `name`, `title`, `model_types` and override what differs."""

    name: str = ""  # registry key, e.g. "qwen2_5_vl"
    title: str = ""  # e.g. "Qwen2.5-VL"
    model_types: Tuple[str, ...] = ()  # config.model_type values of the top-level config
    # Language-model types the family is checked with, for families whose checkpoints pair a vision tower with
    # one of several decoders; () accepts any. Another backbone may route its attention differently (sinks,
    # sliding windows) and is refused until it is checked.
    backbones: Tuple[str, ...] = ()

    def base_model(self, model) -> nn.Module:
        """The multimodal base model inside `model`: its forward gets input_ids, attention_mask, past_key_values."""
        base = getattr(model, "model", None)
        if base is not None and hasattr(base, "language_model"):
            return base
        if hasattr(model, "language_model") and hasattr(model.language_model, "layers"):
            return model
        raise TypeError(f"avar patch: {type(model).__name__} is not a {self.title} model with a language_model")

    def text_model(self, base) -> nn.Module:
        """The language decoder (`.layers`, `.config`) of the base model."""
        return base.language_model

    def attention_layers(self, text_model) -> List[int]:
        """Indices of the decoder layers with softmax self-attention (every layer but linear-attention ones)."""
        types = getattr(text_model.config, "layer_types", None) or ["full_attention"] * len(text_model.layers)
        return [i for i, kind in enumerate(types) if kind not in LINEAR_LAYER_TYPES]

    def attention_module(self, text_model, index: int) -> nn.Module:
        """The attention module of decoder layer `index`."""
        return text_model.layers[index].self_attn

    def visual_token_ids(self, config) -> Tuple[int, ...]:
        """The image / video placeholder ids of the top-level config."""
        ids = []
        for name in ("image_token_id", "video_token_id", "image_token_index", "video_token_index"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value >= 0 and value not in ids:
                ids.append(value)
        return tuple(ids)

    def vision_modules(self, base) -> List[nn.Module]:
        """The vision tower and projector of the base model (what `freeze_vision_tower` freezes)."""
        names = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "mlp1")
        return [getattr(base, n) for n in names if isinstance(getattr(base, n, None), nn.Module)]

    def model_class(self):
        """The transformers class `from_pretrained` loads a checkpoint of this family with."""
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def check_model(self, model, text_model) -> None:
        """Refuse, in one line, a model setting avar cannot run."""
        cfg = text_model.config
        backbone = getattr(cfg, "model_type", None)
        if self.backbones and backbone not in self.backbones:
            raise NotImplementedError(
                f"avar patch: {self.title} with a {backbone!r} language model is not supported (checked: "
                f"{', '.join(self.backbones)})"
            )
        if getattr(cfg, "use_sliding_window", False):
            raise NotImplementedError(f"avar patch: sliding-window layers are not supported ({self.title})")
        kinds = set(getattr(cfg, "layer_types", None) or [])
        unknown = kinds - {"full_attention", *LINEAR_LAYER_TYPES}
        if unknown:
            raise NotImplementedError(
                f"avar patch: {self.title} layers of type {sorted(unknown)} are not supported (sliding windows "
                "and other non-causal patterns need kernel features avar does not have)"
            )

    def __repr__(self) -> str:
        return f"<avar family {self.name}: {self.title}>"
