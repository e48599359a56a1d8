"""One cached decode step of a Qwen2.5-VL, with the inputs `generate()` would give it, and the check of a step
replayed (from a CUDA graph on a GPU) against the same step run eagerly.

The model is called directly (not through `generate`) so that a test can wrap exactly one forward: in a host-sync
recorder, or in a CUDA graph. Qwen2.5-VL needs the position ids of a cached step passed in: left padding and the
rope deltas of the multimodal prefill (kept on the model by that prefill) shift them.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from host_sync import HostSyncRecorder
from test_patch import make_batch

import avar_ops
from avar_ops.analysis.tiny_qwen import build_tiny_qwen2_5_vl
from avar_ops.core import testing
from avar_ops.hf import apply_to_qwen2_5_vl, collect_masses

AVAR_ROOT = os.path.dirname(os.path.abspath(avar_ops.__file__))
BIAS = [0.0, 2.0, -1.0, 1.0]  # per group: other, visual, system, user


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


def identical_caches(model, batch, n: int):
    """(n KV caches holding the same prompt, greedy next ids [B, 1]).

    A step grows the cache it runs on, so every run of "the same step" needs a cache of its own. Each one is
    filled by a prefill of its own (so that the patch has seen its ids) and then given the first one's keys and
    values, so that their states are equal by construction.
    """
    caches = []
    for _ in range(n):
        cache, ids = prefill(model, batch)
        if caches:
            for dst, src in zip(cache.layers, caches[0].layers):
                dst.keys.copy_(src.keys)
                dst.values.copy_(src.values)
        else:
            next_ids = ids
        caches.append(cache)
    return caches, next_ids


def graph_model():
    """The tiny Qwen2.5-VL in bf16 with head dim 64, one the CUDA kernels are built for."""
    return build_tiny_qwen2_5_vl(seed=0, hidden_size=256, num_heads=4, num_kv_heads=2, dtype=torch.bfloat16)


def run_step(model, step: dict, cache):
    """(logits float32 [B, 1, V], per-layer masses float32 [B, H, 1, 4]) of one eager decode step."""
    with collect_masses(model) as rec:
        out = model(**step, past_key_values=cache)
    return out.logits.float(), [m.float() for m in rec.masses]


def check_replayed_step(model, processor, device, replay: Callable) -> None:
    """A decode step of the patched model, replayed with new ids, equals the same step run eagerly.

    `replay(model, step, warm_cache, cache, new_ids)` runs `step` (a decode step feeding the greedy ids) on
    `cache` in the way under test, then writes `new_ids` into `step["input_ids"]` in place and returns (logits,
    masses) of the step with them; `warm_cache` is a second cache in the same state, for a warm-up. The bias
    tables are given on the host, as users give them. New ids make row 0's new key visual, so a replay that kept
    the groups, ids or cache of its first run would differ from the eager step; the test first shows that both
    the ids and the bias move the step far more than the tolerance.
    """
    batch = make_batch(processor, "left").to(device)
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor, bias=BIAS)
    try:
        with torch.no_grad():
            caches, next_ids = identical_caches(model, batch, 5)
            new_ids = next_ids.clone()  # [B, 1]
            new_ids[0, 0] = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            new_ids[1, 0] = processor.tokenizer.encode(" circle")[0]
            step = next_step_inputs(model, batch, new_ids)
            with HostSyncRecorder(AVAR_ROOT) as syncs:
                want_logits, want_masses = run_step(model, step, caches[0])
            assert not syncs.hits, f"the decode step waits for the device: {dict(syncs.hits)}"
            _, first_masses = run_step(model, dict(step, input_ids=next_ids), caches[1])
            handle.set_bias(None)
            plain_logits, _ = run_step(model, step, caches[2])
            handle.set_bias(BIAS)
            got_logits, got_masses = replay(
                model, dict(step, input_ids=next_ids.clone()), caches[3], caches[4], new_ids
            )
    finally:
        handle.revert()

    tol = testing.BF16_REPLAY_ERR
    ids_effect = max(testing.max_abs_err(a, b) for a, b in zip(first_masses, want_masses))
    assert ids_effect > 10 * tol, f"the new ids move the masses by only {ids_effect:.3g}"
    bias_effect = testing.rel_err(plain_logits, want_logits)
    assert bias_effect > 10 * tol, f"the bias moves the logits by only {bias_effect:.3g}"
    err = testing.rel_err(got_logits, want_logits)
    assert err <= tol, f"replayed logits rel error {err:.3g} > {tol:.3g}"
    for layer, (got, want) in enumerate(zip(got_masses, want_masses)):
        err = testing.max_abs_err(got, want)
        assert err <= tol, f"layer {layer}: replayed masses max abs error {err:.3g} > {tol:.3g}"


def eager_replay(model, step, warm_cache, cache, new_ids):
    """The CPU counterpart of tests/test_cuda.py's graph replay: the new ids written in place, then one eager step."""
    step["input_ids"].copy_(new_ids)
    return run_step(model, step, cache)
