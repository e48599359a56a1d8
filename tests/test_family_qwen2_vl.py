"""What is specific to Qwen2-VL (tests/test_families.py runs the checks every family shares).

- its processor renders and tokenizes a conversation exactly as Qwen2.5-VL's does (same tokenizer, special
  tokens and chat template, reused from `tiny_qwen`), so the groups are the same ids' groups;
- its text config can ask for sliding-window layers (`use_sliding_window`, or `sliding_attention` layer types),
  which the kernel does not implement: `apply` refuses them in one line before patching anything.
"""

import pytest

from avar_ops.analysis.tiny_families import qwen2_vl
from avar_ops.analysis.tiny_qwen import build_tiny_processor, synthetic_images
from avar_ops.hf import apply, is_patched, token_groups


def test_same_rendering_and_groups_as_qwen2_5_vl():
    ours = qwen2_vl.build_processor()
    theirs = build_tiny_processor()
    assert type(ours).__name__ == "Qwen2VLProcessor"
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Are you sure?"},
    ]
    images = synthetic_images(1, seed=2)
    batches = []
    for proc in (ours, theirs):
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        batches.append(proc(text=[text], images=images, return_tensors="pt"))
    assert batches[0]["input_ids"].tolist() == batches[1]["input_ids"].tolist()
    assert batches[0]["image_grid_thw"].tolist() == batches[1]["image_grid_thw"].tolist()
    a = token_groups(batches[0]["input_ids"], ours).key_group
    b = token_groups(batches[1]["input_ids"], theirs).key_group
    assert a.tolist() == b.tolist()
    assert set(a[0].tolist()) == {0, 1, 2, 3}  # the default system prompt is there


@pytest.mark.parametrize("setting", ["use_sliding_window", "layer_types"])
def test_sliding_window_layers_are_refused(setting):
    model, processor = qwen2_vl.build(num_layers=2)
    cfg = model.config.text_config
    if setting == "use_sliding_window":
        cfg.use_sliding_window = True
    else:
        cfg.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(NotImplementedError, match=r"^avar patch: .*sliding") as exc:
        apply(model, processor)
    assert "Qwen2-VL" in str(exc.value) and "\n" not in str(exc.value)
    assert not is_patched(model)
    assert cfg._attn_implementation == "sdpa"
