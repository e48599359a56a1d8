"""Where the model looks: attention received by each image patch, mapped onto the image's patch grid.

For chosen decoder layers, the attention each visual key receives from the chosen queries (user-text tokens of
the prompt, or the tokens of a response) is `avar_ops.attention_key_mass`: Σ_i w_i·P_ij with w_i = 1/|Q| on the
queries, i.e. the mean over queries of the attention on key j. It is averaged over heads and chosen layers and
cut into one [grid_h, grid_w] map per image (Qwen2.5-VL merges 2×2 patches into one token: the grid is
image_grid_thw's h and w divided by the merge size, row-major, averaged over temporal patches).

The key mass needs the layer's q, k, the forward's LSE, groups and tables: `avar_ops.hf.capture_attention`
keeps exactly what the patched attention ran on, so nothing is recomputed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from avar_ops.analysis import plots
from avar_ops.core import attention_key_mass, select_indices
from avar_ops.data import build_inputs, inside, load_images, normalize_sample, safe_name
from avar_ops.hf import attention_layer_indices, capture_attention, token_groups
from avar_ops.method import intervened

__all__ = ["ImageAttention", "image_attention", "save_overlays"]

QUERY_KINDS = ("user", "response")


@dataclass
class ImageAttention:
    maps: List[np.ndarray]  # one [grid_h, grid_w] per image: mean attention a query puts on each merged patch
    layers: List[int]
    queries: str  # "user" or "response"
    num_queries: int
    response: Optional[str]  # the response whose tokens were the queries (queries == "response")
    visual_share: float  # Σ of every map: the mean share of a query's attention that lands on images


def _num_decoder_layers(model) -> int:
    """The softmax-attention layers (what layer indices count)."""
    return len(attention_layer_indices(model.config))


def _split_images(received: torch.Tensor, image_mask: torch.Tensor, grid_thw: torch.Tensor, merge: int):
    """received [Lk] and image_mask [Lk] of one sample, grid_thw [N, 3] of its images -> N maps [gh, gw]."""
    values = received[image_mask]  # [n_visual]
    counts = (grid_thw.prod(-1) // (merge * merge)).tolist()
    if sum(counts) != values.numel():
        raise RuntimeError(
            f"image_attention: the sample has {values.numel()} image tokens but image_grid_thw {grid_thw.tolist()} "
            f"implies {sum(counts)}"
        )
    maps = []
    for chunk, (t, h, w) in zip(values.split(counts), grid_thw.tolist()):
        maps.append(chunk.view(t, h // merge, w // merge).mean(0).numpy())  # [gh, gw]
    return maps


def image_attention(
    model,
    processor,
    sample,
    *,
    layers: Sequence[int] = (-1,),
    queries: str = "user",
    intervention=None,
    max_new_tokens: int = 16,
) -> ImageAttention:
    """Attention received by each image patch of one sample, from user-text or response tokens.

    Args:
        model: Qwen2_5_VLForConditionalGeneration. Not patched: it is patched here (with `intervention`'s
            tables if given) and reverted afterwards. Already patched (with tokenizer=processor, so that its
            groups are the processor's): used as it is, and the maps use the tables it runs with; passing an
            intervention for it is then a RuntimeError, as in `avar_ops.hf.patched`.
        sample: dict or JSONL record with at least one image.
        layers: decoder layers to average over (negative counts from the end).
        queries: "user" (the prompt's user-text tokens) or "response" (the sample's "response" if it has one,
            else a greedy generation of up to max_new_tokens tokens).
        intervention: an `avar_ops.method.Intervention` to patch an unpatched model with.
    """

    if queries not in QUERY_KINDS:
        raise ValueError(f"image_attention: queries must be one of {QUERY_KINDS}, got {queries!r}")
    sample = normalize_sample(sample, 0)
    if not sample["images"]:
        raise ValueError("image_attention: the sample has no image")
    chosen = select_indices(layers, _num_decoder_layers(model), "image_attention: layers")
    device = next(model.parameters()).device

    with intervened(model, processor, intervention), torch.no_grad():
        response = sample["response"]
        inputs = build_inputs(
            processor, [sample], responses=[response] if response is not None else None, device=device
        )
        if queries == "response" and response is None:
            prompt_len = inputs["input_ids"].shape[1]
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, prompt_len:]  # [1, T]
            response = processor.tokenizer.decode(new[0], skip_special_tokens=True)
            inputs["input_ids"] = out
            inputs["attention_mask"] = torch.cat(
                [inputs["attention_mask"], torch.ones_like(new, dtype=inputs["attention_mask"].dtype)], dim=1
            )
            if "mm_token_type_ids" in inputs:  # 3D rotary positions need it; generated tokens are text (0)
                inputs["mm_token_type_ids"] = torch.cat(
                    [inputs["mm_token_type_ids"], torch.zeros_like(new, dtype=inputs["mm_token_type_ids"].dtype)], dim=1
                )
        with capture_attention(model, chosen) as capture:
            model(**inputs, use_cache=False)

        groups = token_groups(inputs["input_ids"], processor, inputs.get("attention_mask"))
        qmask = groups.user_mask if queries == "user" else groups.response_mask  # [1, L]
        n_q = int(qmask.sum())
        if n_q == 0:
            raise ValueError(f"image_attention: the sample has no {queries} token to use as queries")
        weight = (qmask.to(torch.float32) / n_q).to(device)  # [1, L]
        received = torch.zeros(qmask.shape[1], dtype=torch.float64)  # [L]
        for j in chosen:
            c = capture.inputs[j]
            km = attention_key_mass(
                c.query, c.key, c.lse, weight, c.key_group, c.bias, logit_scale=c.logit_scale, scale=c.scale
            )  # [1, H, L]
            received += km[0].mean(0).double().cpu()
        received /= len(chosen)

    merge = int(model.config.vision_config.spatial_merge_size)
    maps = _split_images(received, groups.image_mask[0].cpu(), inputs["image_grid_thw"].cpu(), merge)
    return ImageAttention(
        maps=maps,
        layers=chosen,
        queries=queries,
        num_queries=n_q,
        response=response if queries == "response" else None,
        visual_share=float(sum(m.sum() for m in maps)),
    )


def save_overlays(result: ImageAttention, sample, out_dir: str, prefix: str = "attention") -> List[str]:
    """One PNG per image, `out_dir/{prefix}_image{n}.png`: the image and the attention map upsampled over it.

    `prefix` becomes a file name through `paths.safe_name` (no folders), so it may hold a sample id.
    """
    sample = normalize_sample(sample, 0)
    images = load_images(sample)
    prefix = safe_name(prefix, default="attention")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for n, (img, heat) in enumerate(zip(images, result.maps)):
        title = (
            f"{result.queries} tokens → image {n + 1}, layers {result.layers} "
            f"(share on all images {result.visual_share:.3f})"
        )
        paths.append(
            plots.image_attention_overlay(img, heat, inside(out_dir, f"{prefix}_image{n + 1}.png"), title=title)
        )
    return paths
