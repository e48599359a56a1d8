"""`render_chat`: contents written as lists of text parts reach a template that prints `{{ content }}` as it comes
(GLM-4.1V's published template does this for system and assistant turns) as their text, not as a Python repr;
templates that read parts (every tiny family's) get the messages unchanged."""

import pytest

from avar_ops.analysis import build_tiny, build_tiny_processor, tiny_family_names
from avar_ops.hf import render_chat, token_groups

# A template that prints system and assistant contents raw and reads user contents as parts.
RAW_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'user' %}{% for p in m['content'] %}{% if p['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
]


def test_raw_contents_are_rendered_as_text():
    processor = build_tiny_processor()
    processor.chat_template = RAW_TEMPLATE
    processor.tokenizer.chat_template = RAW_TEMPLATE
    plain = processor.apply_chat_template(MESSAGES, tokenize=False)
    assert "'type': 'text'" in plain  # what the template does with a list: the bug this guards against
    text = render_chat(processor, MESSAGES, add_generation_prompt=False)
    assert "'type'" not in text and "system\nBe brief.<|im_end|>" in text and "assistant\nRed.<|im_end|>" in text
    assert "<|image_pad|><|vision_end|>What colour?" in text  # the user turn keeps its parts
    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    groups = token_groups(ids, processor)
    system_text = processor.tokenizer.decode(ids[0][groups.system_mask[0]])
    assert "Be brief." in system_text and "{" not in system_text


@pytest.mark.parametrize("family", tiny_family_names())
def test_templates_that_read_parts_get_the_messages_unchanged(family):
    _, processor = build_tiny(family, seed=0)
    want = processor.apply_chat_template(MESSAGES, tokenize=False)
    assert render_chat(processor, MESSAGES, add_generation_prompt=False) == want
