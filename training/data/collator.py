"""Batches of `Record`s for any supported family: chat template, image processing, labels, token groups, masks.

Each record is rendered by the processor's chat template and processed on its own (so that its token count is
known before padding), then the batch is padded. What a batch holds:

    input_ids, attention_mask          [B, L]  (right-padded for SFT, left-padded for prompts)
    pixel_values, image_grid_thw, …    the processor's image outputs, concatenated in record order (absent without
                                       images; zero-padded past dim 0 where records differ, e.g. LLaVA-OneVision's
                                       AnyRes patches, which the model cuts back by image_sizes)
    mm_token_type_ids                  [B, L]  when the processor makes them
    labels                             [B, L]  SFT only: the assistant turns' tokens (content and the token
                                               ending the turn: Qwen's <|im_end|>; in a template with no closing
                                               token the next opener, and `turn_end` appended after the last
                                               answer), -100 elsewhere
    key_group                          int8 [B, L], -1..3, and the bool [B, L] masks user_mask, image_mask,
    user_mask, image_mask, ...         system_mask, response_mask: `avar_ops` token groups of input_ids, as the
                                       patch computes them during the forward
    record_ids                         list of B strings

The token budget `max_length` may cut text after the last image, never an image: a record whose image tokens
reach past the budget is an error that names it (lower `max_pixels` or raise `max_length`), and so is an SFT
record left with no target token. Cuts that are allowed are counted in `truncated` and logged. Any other error
while a record is processed (an unreadable image, the processor raising, even StopIteration) is a
`CollateError` that names the record, so a run stops on it instead of reading it as the end of the data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from avar_ops.data import Record, check_messages
from avar_ops.hf import render_chat, template_tokens, token_groups

__all__ = ["QwenVLCollator", "CollateError", "Measure", "MODES", "has_pixel_budget"]

logger = logging.getLogger(__name__)

MODES = ("sft", "prompt")
_MASKS = ("user_mask", "image_mask", "system_mask", "response_mask")


class CollateError(ValueError):
    """A record that cannot be turned into model inputs under the collator's settings."""


@dataclass(frozen=True)
class Measure:
    """One record's token counts as the collator would encode it, found without processing its pixels."""

    length: int  # tokens of the whole rendered record, image tokens included (before any cut to max_length)
    last_vision: int  # position of its last vision token (image pad or marker), -1 without images
    first_response: Optional[int]  # position of its first assistant-turn token (SFT), None when there is none
    has_image: bool
    has_system: bool
    has_user: bool


_EDGES = ("shortest_edge", "longest_edge")
_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def has_pixel_budget(processor) -> bool:
    """Whether the processor resizes images into a min / max pixel budget (Qwen2-VL's smart resize and its kin)."""
    return _has_pixel_budget(getattr(processor, "image_processor", None))


def _has_pixel_budget(image_processor) -> bool:
    size = getattr(image_processor, "size", None)
    edges = [getattr(size, k, None) if not isinstance(size, dict) else size.get(k) for k in _EDGES]
    return all(e is not None for e in edges) and hasattr(image_processor, "merge_size")


def _cat_padded(parts):
    """Concatenate along dim 0, zero-padding the other dims to the largest (records with different tile counts)."""
    if all(p.shape[1:] == parts[0].shape[1:] for p in parts):
        return torch.cat(parts)
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    out = []
    for p in parts:
        pad = []
        for d in reversed(range(1, p.dim())):
            pad += [0, shape[d - 1] - p.shape[d]]
        out.append(torch.nn.functional.pad(p, pad))
    return torch.cat(out)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"QwenVLCollator: {name} must be a positive int, got {value!r}")
    return value


class QwenVLCollator:
    """Callable turning a list of `Record`s into a batch (see the module docstring).

    mode "sft": the whole conversation, labels on assistant tokens, right padding. mode "prompt": the
    conversation without its final assistant turn plus the generation header, left padding (for generate).
    min_pixels / max_pixels: the image budget each image is resized into, for image processors with a pixel
    budget (Qwen2-VL's smart resize: Qwen2/2.5/3-VL, GLM-4.1V); None keeps the processor's own sizes, and is
    the only choice for the others (LLaVA-OneVision's AnyRes grid, InternVL's tiles).
    """

    def __init__(
        self,
        processor,
        *,
        max_length: int,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        mode: str = "sft",
    ):
        if mode not in MODES:
            raise ValueError(f"QwenVLCollator: mode must be one of {MODES}, got {mode!r}")
        if not hasattr(processor, "tokenizer") or not hasattr(processor, "apply_chat_template"):
            raise TypeError(
                f"QwenVLCollator: processor must be a multimodal processor with a chat template, got "
                f"{type(processor).__name__}"
            )
        self.processor = processor
        self.max_length = _positive_int("max_length", max_length)
        self.budget = _has_pixel_budget(getattr(processor, "image_processor", None))
        if not self.budget and (min_pixels is not None or max_pixels is not None):
            raise ValueError(
                f"QwenVLCollator: min_pixels / max_pixels set, but the image processor "
                f"{type(getattr(processor, 'image_processor', None)).__name__} has no pixel budget; leave them unset"
            )
        self.min_pixels = None if min_pixels is None else _positive_int("min_pixels", min_pixels)
        self.max_pixels = None if max_pixels is None else _positive_int("max_pixels", max_pixels)
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"QwenVLCollator: min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
        self._expansions: dict = {}
        self.mode = mode
        self.template = template_tokens(processor)
        pad = processor.tokenizer.pad_token_id
        if pad is None:
            raise ValueError("QwenVLCollator: the tokenizer has no pad token")
        self.pad_id = int(pad)
        self.truncated = 0

    def render(self, record: Record) -> str:
        """The chat-template text of one record as this collator feeds it to the processor.

        TextError when a text holds a special token of the processor's tokenizer (`<image>`, `<img>`, …).
        """
        check_messages(record.messages, where=f"record {record.id!r}", tokenizer=self.processor)
        if self.mode == "sft":
            if not record.has_target:
                raise CollateError(f"record {record.id!r}: SFT needs a final assistant turn, the record has none")
            text = render_chat(self.processor, list(record.messages), add_generation_prompt=False)
            if self.template.closer is None:
                # No closing token after the last answer (GLM): the token that would open the next turn, which
                # is what the model writes to stop, becomes the last target.
                text += self.processor.tokenizer.convert_ids_to_tokens(self.template.turn_end)
            return text
        return render_chat(self.processor, record.prompt_messages, add_generation_prompt=True)

    def _size_kwargs(self) -> dict:
        if not self.budget or (self.min_pixels is None and self.max_pixels is None):
            return {}
        ip = self.processor.image_processor
        size = {k: getattr(ip.size, k, None) if not isinstance(ip.size, dict) else ip.size.get(k) for k in _EDGES}
        if self.min_pixels is not None:
            size["shortest_edge"] = self.min_pixels
        if self.max_pixels is not None:
            size["longest_edge"] = self.max_pixels
        return {"size": size}

    def expansion(self, width: int, height: int) -> list:
        """The token ids the processor puts in place of one image placeholder for a width × height image (the
        placeholders, and the markers some families add around them), found once per size on a blank image."""
        key = (int(width), int(height))
        if key not in self._expansions:
            from PIL import Image

            pad = self.processor.image_token
            out = self.processor(
                text=[pad], images=[[Image.new("RGB", key)]], return_tensors="pt", **self._size_kwargs()
            )
            self._expansions[key] = [int(i) for i in out["input_ids"][0]]
        return self._expansions[key]

    def image_tokens(self, width: int, height: int) -> int:
        """The number of image placeholder tokens an image of width × height pixels becomes under these settings."""
        visual = set(self.template.visual)
        return sum(1 for i in self.expansion(width, height) if i in visual)

    def measure(self, record: Record) -> Measure:
        """The record's token counts and which token groups it has, from its rendered text and its images' sizes
        (read from the file headers): the tokenizer's work without the image processor's, so that a whole data
        file is measured before a run. Equals what `__call__` encodes (tests/test_preflight.py checks it)."""
        from PIL import Image

        text = self.render(record)
        pad = self.processor.image_token
        pieces = text.split(pad)
        if len(pieces) - 1 != len(record.images):
            raise CollateError(
                f"record {record.id!r}: the rendered prompt has {len(pieces) - 1} image slots for "
                f"{len(record.images)} images"
            )
        tok = self.processor.tokenizer
        ids_list = [int(i) for i in tok(pieces[0], verbose=False, add_special_tokens=False)["input_ids"]]
        for path, piece in zip(record.images, pieces[1:]):
            with Image.open(path) as img:
                ids_list += self.expansion(*img.size)
            ids_list += [int(i) for i in tok(piece, verbose=False, add_special_tokens=False)["input_ids"]]
        ids = torch.tensor(ids_list, dtype=torch.long)  # [n]
        t = self.template
        vision = torch.isin(ids, torch.tensor(t.vision_ids, dtype=ids.dtype))  # [n]
        groups = token_groups(ids[None], self.template)
        response = torch.nonzero(groups.response_mask[0])
        return Measure(
            length=len(ids),
            last_vision=int(torch.nonzero(vision).max()) if bool(vision.any()) else -1,
            first_response=int(response.min()) if len(response) else None,
            has_image=bool(groups.image_mask.any()),
            has_system=bool(groups.system_mask.any()),
            has_user=bool(groups.user_mask.any()),
        )

    def _encode(self, record: Record) -> dict:
        from PIL import Image

        text = self.render(record)
        kwargs = {}
        if record.images:
            images = []
            for path in record.images:
                with Image.open(path) as img:
                    images.append(img.convert("RGB"))
            kwargs["images"] = [images]
            kwargs.update(self._size_kwargs())
        out = self.processor(text=[text], return_tensors="pt", **kwargs)
        ids = out["input_ids"][0]  # [n]
        t = self.template
        if len(ids) > self.max_length:
            vision = torch.isin(ids, torch.tensor(t.vision_ids, dtype=ids.dtype))  # [n]
            last_vision = int(torch.nonzero(vision).max()) if bool(vision.any()) else -1
            if last_vision >= self.max_length:
                raise CollateError(
                    f"record {record.id!r}: max_length={self.max_length} would cut through image tokens "
                    f"(the record has {len(ids)} tokens, its image tokens end at position {last_vision}); "
                    f"raise max_length or lower max_pixels (now {self.max_pixels})"
                )
            self.truncated += 1
            logger.warning(
                "record %r: %d tokens cut to max_length=%d (text after the images); %d cut so far",
                record.id,
                len(ids),
                self.max_length,
                self.truncated,
            )
        n = min(len(ids), self.max_length)
        row = {"input_ids": ids[:n]}  # [n]
        if "mm_token_type_ids" in out:
            row["mm_token_type_ids"] = out["mm_token_type_ids"][0, :n]  # [n]
        if record.images:
            # The image outputs: Qwen's pixel_values [patches, C·T·P·P] and image_grid_thw [images, 3], LLaVA's
            # pixel_values [1, tiles, C, H, W] and image_sizes, InternVL's tiles, ...
            row["images"] = {k: v for k, v in out.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
        return row

    def _encode_or_fail(self, record: Record) -> dict:
        # Any error becomes a CollateError naming the record: a StopIteration escaping the collator would
        # otherwise end the DataLoader's iteration, which Trainer reads as the end of the data.
        try:
            return self._encode(record)
        except CollateError:
            raise
        except Exception as exc:
            detail = " ".join(str(exc).split()) or "no message"
            raise CollateError(f"record {record.id!r}: cannot be processed ({type(exc).__name__}: {detail})") from exc

    def __call__(self, records: Sequence[Record]) -> dict:
        if not records:
            raise CollateError("QwenVLCollator: empty batch")
        for r in records:
            if not isinstance(r, Record):
                raise TypeError(f"QwenVLCollator: expected Record objects, got {type(r).__name__}")
        rows = [self._encode_or_fail(r) for r in records]
        B, L = len(rows), max(len(r["input_ids"]) for r in rows)
        left = self.mode == "prompt"
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros(B, L, dtype=torch.long)  # [B, L]
        with_types = all("mm_token_type_ids" in r for r in rows)
        types = torch.zeros(B, L, dtype=torch.long)  # [B, L]
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            span = slice(L - n, L) if left else slice(0, n)
            input_ids[b, span] = row["input_ids"]
            attention_mask[b, span] = 1
            if with_types:
                types[b, span] = row["mm_token_type_ids"]
        groups = token_groups(input_ids, self.template, attention_mask)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_types:
            batch["mm_token_type_ids"] = types
        with_images = [r["images"] for r in rows if "images" in r]
        for name in with_images[0] if with_images else ():
            batch[name] = _cat_padded([r[name] for r in with_images])
        if self.mode == "sft":
            labels = input_ids.masked_fill(~groups.response_mask, -100)  # [B, L]
            empty = [records[b].id for b in range(B) if not bool(groups.response_mask[b].any())]
            if empty:
                raise CollateError(f"records {empty}: no target token left within max_length={self.max_length}")
            batch["labels"] = labels
        batch["key_group"] = groups.key_group
        for name in _MASKS:
            batch[name] = getattr(groups, name)
        batch["record_ids"] = [r.id for r in records]
        return batch

    @staticmethod
    def model_inputs(batch: dict) -> dict:
        """The entries of a batch the model's forward takes (everything but groups, masks and ids)."""
        skip = set(_MASKS) | {"key_group", "record_ids"}
        return {k: v for k, v in batch.items() if k not in skip}
