"""Where the model looks: attention received by each image patch, mapped onto the image's patch grid.

For chosen decoder layers, the attention each visual key receives from the chosen queries (user-text tokens of
the prompt, or the tokens of a response) is `avar_ops.attention_key_mass`: Σ_i w_i·P_ij with w_i = 1/|Q| on the
queries, i.e. the mean over queries of the attention on key j. It is averaged over heads and chosen layers and
cut into one [grid_h, grid_w] map per image (Qwen2.5-VL merges 2×2 patches into one token: the grid is
image_grid_thw's h and w divided by the merge size, row-major, averaged over temporal patches).

The key mass needs the layer's q, k and the forward's LSE. The patch does not hand them out, so forward
pre-hooks on the chosen attention modules capture their inputs (hidden states and rotary cos / sin) and q, k, v
are recomputed with the module's own projections and rotary embedding; the LSE comes from one extra
`avar_ops.attention` call with the same groups, bias and logit scale the patched forward used.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

import avar_ops
from avar_ops.groups import token_groups
from avar_ops.samples import build_inputs, load_images, normalize_sample

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


def _decoder_layers(model):
    base = getattr(model, "model", model)
    lm = getattr(base, "language_model", None)
    if lm is None or not hasattr(lm, "layers"):
        raise TypeError(f"image_attention: expected a Qwen2.5-VL model, got {type(model).__name__}")
    return lm.layers


def _rotary(attn_module):
    """The rotary function of the module's own modelling file (what its forward applies)."""
    fn = getattr(sys.modules[type(attn_module).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise RuntimeError(
            f"image_attention: cannot find apply_rotary_pos_emb next to {type(attn_module).__name__}; this "
            "transformers version lays out Qwen2.5-VL differently"
        )
    return fn


class _Capture:
    """Forward pre-hook: keeps the attention module's hidden states [B, L, hidden] and rotary (cos, sin)."""

    def __init__(self):
        self.hidden, self.cos_sin = None, None

    def __call__(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos_sin = kwargs.get("position_embeddings")
        if hidden is None or cos_sin is None:
            raise RuntimeError(
                "image_attention: the attention module was called without hidden_states / position_embeddings "
                "keywords; this transformers version calls Qwen2.5-VL's attention differently"
            )
        self.hidden, self.cos_sin = hidden.detach(), tuple(t.detach() for t in cos_sin)


def _qkv(attn, capture: _Capture):
    """q [B, L, H, D], k and v [B, L, H_kv, D] exactly as the module computes them."""
    h = capture.hidden  # [B, L, hidden]
    B, L, _ = h.shape
    D = attn.head_dim
    q = attn.q_proj(h).view(B, L, -1, D).transpose(1, 2)  # [B, H, L, D]
    k = attn.k_proj(h).view(B, L, -1, D).transpose(1, 2)  # [B, H_kv, L, D]
    v = attn.v_proj(h).view(B, L, -1, D)  # [B, L, H_kv, D]
    cos, sin = capture.cos_sin
    q, k = _rotary(attn)(q, k, cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v  # BSHD views


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
        model: Qwen2_5_VLForConditionalGeneration, not patched (it is patched here, with `intervention`'s
            tables if given, so that the maps show the attention of the forward the tables apply to).
        sample: dict or JSONL record with at least one image.
        layers: decoder layers to average over (negative counts from the end).
        queries: "user" (the prompt's user-text tokens) or "response" (the sample's "response" if it has one,
            else a greedy generation of up to max_new_tokens tokens).
    """
    from avar_ops import patch
    from avar_ops.intervention import Intervention
    from avar_ops.intervention import apply as apply_intervention

    if queries not in QUERY_KINDS:
        raise ValueError(f"image_attention: queries must be one of {QUERY_KINDS}, got {queries!r}")
    if getattr(model, "_avar_handle", None) is not None:
        raise RuntimeError(
            "image_attention: the model is already patched, and the maps must use the same bias as its forward; "
            "revert it (avar_ops.patch.revert(model)) and pass the intervention here"
        )
    sample = normalize_sample(sample, 0)
    if not sample["images"]:
        raise ValueError("image_attention: the sample has no image")
    decoder = _decoder_layers(model)
    num_layers = len(decoder)
    chosen = []
    for i in layers:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(f"image_attention: layer {i} out of range for {num_layers} decoder layers")
        chosen.append(j)
    chosen = sorted(set(chosen))
    if not chosen:
        raise ValueError("image_attention: layers must not be empty")
    num_heads = decoder[0].self_attn.config.num_attention_heads
    iv = intervention if intervention is not None else Intervention()
    tables = iv.tables(num_layers, num_heads)
    device = next(model.parameters()).device

    handle = apply_intervention(model, iv, tokenizer=processor) if intervention is not None else \
        patch.apply_to_qwen2_5_vl(model, tokenizer=processor)
    hooks = []
    try:
        with torch.no_grad():
            response = sample["response"]
            inputs = build_inputs(processor, [sample], responses=[response] if response is not None else None,
                                  device=device)
            if queries == "response" and response is None:
                prompt_len = inputs["input_ids"].shape[1]
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                new = out[:, prompt_len:]  # [1, T]
                response = processor.tokenizer.decode(new[0], skip_special_tokens=True)
                inputs["input_ids"] = out
                inputs["attention_mask"] = torch.cat(
                    [inputs["attention_mask"], torch.ones_like(new, dtype=inputs["attention_mask"].dtype)], dim=1)
                if "mm_token_type_ids" in inputs:  # 3D rotary positions need it; generated tokens are text (0)
                    inputs["mm_token_type_ids"] = torch.cat(
                        [inputs["mm_token_type_ids"], torch.zeros_like(new, dtype=inputs["mm_token_type_ids"].dtype)],
                        dim=1)
            captures = {}
            for j in chosen:
                captures[j] = _Capture()
                hooks.append(decoder[j].self_attn.register_forward_pre_hook(captures[j], with_kwargs=True))
            model(**inputs, use_cache=False)
            for hk in hooks:
                hk.remove()
            hooks.clear()

            groups = token_groups(inputs["input_ids"], processor, inputs.get("attention_mask"))
            qmask = groups.user_mask if queries == "user" else groups.response_mask  # [1, L]
            n_q = int(qmask.sum())
            if n_q == 0:
                raise ValueError(f"image_attention: the sample has no {queries} token to use as queries")
            weight = qmask.to(torch.float32) / n_q  # [1, L]
            key_group = groups.key_group.to(device)  # [1, L]
            received = torch.zeros(key_group.shape[1], dtype=torch.float64)  # [L]
            for j in chosen:
                attn = decoder[j].self_attn
                q, k, v = _qkv(attn, captures[j])
                bias = None if tables.bias is None else tables.bias[j].to(device)
                gamma = None if tables.logit_scale is None else tables.logit_scale[j].to(device)
                lse = avar_ops.attention(q, k, v, key_group, bias, logit_scale=gamma, scale=attn.scaling).lse
                km = avar_ops.attention_key_mass(q, k, lse, weight.to(device), key_group, bias, logit_scale=gamma,
                                                 scale=attn.scaling)  # [1, H, L]
                received += km[0].mean(0).double().cpu()
            received /= len(chosen)
    finally:
        for hk in hooks:
            hk.remove()
        handle.revert()

    merge = int(model.config.vision_config.spatial_merge_size)
    maps = _split_images(received, groups.image_mask[0].cpu(), inputs["image_grid_thw"].cpu(), merge)
    return ImageAttention(
        maps=maps, layers=chosen, queries=queries, num_queries=n_q,
        response=response if queries == "response" else None,
        visual_share=float(sum(m.sum() for m in maps)),
    )


def save_overlays(result: ImageAttention, sample, out_dir: str, prefix: str = "attention") -> List[str]:
    """One PNG per image: the image and the attention map upsampled over it."""
    from avar_ops import vas_plots

    sample = normalize_sample(sample, 0)
    images = load_images(sample)
    paths = []
    for n, (img, heat) in enumerate(zip(images, result.maps)):
        title = (f"{result.queries} tokens → image {n + 1}, layers {result.layers} "
                 f"(share on all images {result.visual_share:.3f})")
        paths.append(vas_plots.image_attention_overlay(
            img, heat, os.path.join(out_dir, f"{prefix}_image{n + 1}.png"), title=title))
    return paths
