"""A cached decode step of the patched model reads no tensor value on the host: on CUDA it never waits for the GPU.

Proven on the CPU: every operation that would make the host wait for the device (a value read, a shape made
from tensor values, a host/device copy) is recorded during one decode step, with the Python line that issued it.
The avar code (the forward hooks, the group history, the attention function) issues none; transformers'
Qwen2.5-VL decode step issues none either, which is what lets a whole decode step be captured in a CUDA graph
(tests/test_cuda.py does so on a GPU; its comparison runs here too, with an eager step in place of the replay).
Copies from host memory, which a CPU run cannot show, are seen on the meta device standing in for the GPU.
"""

import os

import pytest
import torch
from decode_steps import (
    AVAR_ROOT,
    BIAS,
    check_replayed_step,
    eager_replay,
    graph_model,
    next_step_inputs,
    prefill,
)
from host_sync import HostSyncRecorder
from test_patch import make_batch

from avar_ops.analysis.tiny_qwen import build_tiny_qwen2_5_vl
from avar_ops.core import testing
from avar_ops.hf import apply_to_qwen2_5_vl, collect_masses, token_groups
from avar_ops.hf.patch import _on_device, _PatchState

TESTS_ROOT = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_qwen2_5_vl(seed=0)


_t = torch.arange(6.0)  # [6]
_mask = _t > 2  # [6]
SYNCS = {
    "item": lambda: _t[0].item(),
    "bool": lambda: bool(_t[1]),
    "if": lambda: 1 if _t.sum() > 0 else 0,
    "int": lambda: int(_t[2]),
    "tolist": lambda: _t.tolist(),
    "cpu": lambda: _t.cpu(),
    "equal": lambda: torch.equal(_t, _t),
    "nonzero": lambda: _mask.nonzero(),
    "masked_select": lambda: _t.masked_select(_mask),
    "unique": lambda: _t.unique(),
    "boolean index": lambda: _t[_mask],
    "boolean assignment": lambda: _t.clone().__setitem__(_mask, 0.0),
    "repeat_interleave": lambda: _t.repeat_interleave(_mask.long()),
}


@pytest.mark.parametrize("name", list(SYNCS))
def test_recorder_sees_each_kind_of_sync(name):
    with HostSyncRecorder(TESTS_ROOT) as rec:
        SYNCS[name]()
    sites = {site for _, site in rec.under_root()}
    assert sites and all(site.startswith("tests/test_decode_sync.py:") for site in sites), rec.hits


def test_recorder_passes_sync_free_code():
    with HostSyncRecorder(TESTS_ROOT) as rec:
        _t.masked_fill(_mask, 0.0).cumsum(0)[: _t.shape[0] // 2]
        _t.repeat_interleave(2)
        torch.where(_mask, _t, -_t)
    assert not rec.hits


@pytest.mark.parametrize("groups", ["tokenizer", "set_key_groups"])
def test_cached_decode_step_reads_no_tensor_on_the_host(tiny, groups):
    model, processor = tiny
    batch = make_batch(processor, "left")
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor if groups == "tokenizer" else None, bias=BIAS)
    try:
        if groups == "set_key_groups":
            key_group = token_groups(batch["input_ids"], processor, batch["attention_mask"]).key_group  # [B, L]
            # The recorder does see the avar code: checking these groups' values reads them on the host.
            with HostSyncRecorder(AVAR_ROOT) as setting:
                handle.set_key_groups(key_group)
            assert any(site.startswith("avar_ops/hf/patch.py:") for _, site in setting.under_root())
        with torch.no_grad():
            cache, next_ids = prefill(model, batch)
            step = next_step_inputs(model, batch, next_ids)
            with collect_masses(model) as rec, HostSyncRecorder(AVAR_ROOT) as syncs:
                out = model(**step, past_key_values=cache)
        avar_syncs = syncs.under_root()
        assert not avar_syncs, f"the avar code waits for the device in a decode step: {dict(avar_syncs)}"
        assert not syncs.hits, f"transformers' decode step waits for the device: {dict(syncs.hits)}"

        # It was a real cached step, whose masses see the prompt's groups.
        B, L = batch["input_ids"].shape
        assert cache.get_seq_length() == L + 1
        assert out.logits.shape[:2] == (B, 1)
        for mass in rec.masses:
            assert mass.shape == (B, model.config.text_config.num_attention_heads, 1, 4)
            assert (mass[..., 1:] > 0).all(), "the new token puts no mass on the visual, system or user keys"
    finally:
        handle.revert()


def test_decode_step_is_the_one_generate_runs(tiny):
    model, processor = tiny
    batch = make_batch(processor, "left")
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor, bias=BIAS)
    try:
        with torch.no_grad():
            gen = model.generate(
                **batch, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
            cache, next_ids = prefill(model, batch)
            out = model(**next_step_inputs(model, batch, next_ids), past_key_values=cache)
    finally:
        handle.revert()
    assert torch.equal(next_ids[:, 0], gen.sequences[:, batch["input_ids"].shape[1]])
    assert testing.rel_err(out.logits[:, -1], gen.logits[1]) <= testing.FP32_MODEL_REL


def test_replayed_step_check_on_cpu():
    model, processor = graph_model()
    check_replayed_step(model, processor, "cpu", eager_replay)


def test_host_tables_are_copied_once_and_again_after_a_change():
    # A copy from host memory waits for the GPU: tables given on the host are copied once per device. The meta
    # device stands in for a GPU here (tests/test_cuda.py runs the real thing).
    state = _PatchState(num_layers=1, num_heads=1, template=None, bias=[None], logit_scale=[None])
    table = torch.tensor([0.0, 1.0, 2.0, 3.0])  # [4]
    device = torch.device("meta")
    first = _on_device(state, table, device)
    assert first.device == device and _on_device(state, table, device) is first
    table.add_(1.0)
    assert _on_device(state, table, device) is not first, "an in-place change must be copied again"
    trainable = table.clone().requires_grad_()  # [4]
    moved = _on_device(state, trainable, device)
    assert moved.grad_fn is not None and _on_device(state, trainable, device) is not moved
    assert _on_device(state, table, torch.device("cpu")) is table


@pytest.mark.parametrize("groups", ["tokenizer", "set_key_groups"])
def test_decode_step_on_a_device_copies_nothing_from_the_host(groups):
    # On a GPU a copy from host memory waits for it (and cannot be captured in a graph). The meta device stands
    # in for the GPU, so such copies show: the host tables (and groups) are copied in the first forward only, and
    # the decode step (the patch's and transformers' own) copies and reads nothing. Text only: the multimodal
    # prefill reads image grids on the host, which the meta device cannot answer.
    model, processor = build_tiny_qwen2_5_vl(seed=0)
    processor.tokenizer.padding_side = "left"
    chats = [
        [{"role": "user", "content": "What colour is the square?"}],
        [
            {"role": "system", "content": "You are a careful visual reasoning assistant."},
            {"role": "user", "content": "How many circles are there? Answer with a single word."},
        ],
    ]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    prompt = processor.tokenizer(texts, return_tensors="pt", padding=True)
    assert not prompt["attention_mask"].bool().all(), "the batch must contain padding"
    model = model.to("meta")
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor if groups == "tokenizer" else None, bias=BIAS)
    if groups == "set_key_groups":
        handle.set_key_groups(token_groups(prompt["input_ids"], processor, prompt["attention_mask"]).key_group)
    ids, mask = prompt["input_ids"].to("meta"), prompt["attention_mask"].to("meta")  # [B, L] each
    next_ids = torch.zeros(ids.shape[0], 1, dtype=torch.long, device="meta")  # [B, 1]
    try:
        with torch.no_grad():
            with HostSyncRecorder(AVAR_ROOT) as first:
                cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
            with collect_masses(model) as rec, HostSyncRecorder(AVAR_ROOT) as syncs:
                out = model(
                    input_ids=next_ids,
                    attention_mask=torch.cat([mask, torch.ones_like(next_ids)], dim=1),
                    past_key_values=cache,
                    use_cache=True,
                )
    finally:
        handle.revert()
    copies = {site for (op, site) in first.hits if op.startswith("aten._to_copy")}
    assert copies and all(site.startswith("avar_ops/hf/patch.py:") for site in copies), dict(first.hits)
    assert sum(first.hits.values()) == (1 if groups == "tokenizer" else 2), "one copy per table / group tensor"
    assert not syncs.hits, f"the decode step copies from or reads on the host: {dict(syncs.hits)}"
    assert out.logits.shape[:2] == (ids.shape[0], 1) and len(rec.masses) == model.config.text_config.num_hidden_layers
