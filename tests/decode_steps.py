"""One cached decode step of a Qwen2.5-VL, with the inputs `generate()` would give it.

The model is called directly (not through `generate`) so that a test can wrap exactly one forward: in a host-sync
recorder, or in a CUDA graph. Qwen2.5-VL needs the position ids of a cached step passed in: left padding and the
rope deltas of the multimodal prefill (kept on the model by that prefill) shift them.
"""

from __future__ import annotations

import torch


def next_step_inputs(model, batch, next_ids: torch.Tensor) -> dict:
    """Keyword arguments (without the cache) of the forward that feeds `next_ids` [B, 1] after `batch`'s prompt."""
    mask = torch.cat([batch["attention_mask"], torch.ones_like(next_ids)], dim=1)  # [B, P + 1]
    text = mask.long().cumsum(-1)[:, -1:] - 1  # [B, 1] position of the new token among the row's real tokens
    rope = text + model.model.rope_deltas  # [B, 1]
    position_ids = torch.cat([text[None], rope[None].expand(3, -1, -1)], dim=0)  # [4, B, 1]: text, then t/h/w
    return dict(input_ids=next_ids, attention_mask=mask, position_ids=position_ids, use_cache=True)


def prefill(model, batch):
    """(cache, greedy next ids [B, 1]) after running the prompt."""
    out = model(**batch, use_cache=True)
    return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
