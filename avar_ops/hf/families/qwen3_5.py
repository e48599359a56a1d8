"""Qwen3.5 (dense and MoE): a natively multimodal model whose text decoder is hybrid.

Three decoder layers in four are Gated DeltaNet linear attention (`layers[i].linear_attn`, a recurrent state, no
attention map) and every fourth is gated softmax attention (`layers[i].self_attn`, GQA with q/k norms and partial
interleaved MRoPE). Only the softmax layers go through avar: `attention_layers` is the `full_attention` entries
of `config.layer_types` (the contract's default), and the linear layers keep transformers' own implementation,
torch code on CPU or the flash-linear-attention / causal-conv1d kernels where installed. The chat layout is
Qwen's `<|im_start|>` turns (no default system turn; `<think>` blocks in the generation prompt and in answered
turns after the last user turn, which are response tokens), learned from the template like every family's.
"""

from avar_ops.hf.families.base import Family


class Qwen3_5(Family):
    name = "qwen3_5"
    title = "Qwen3.5"
    model_types = ("qwen3_5", "qwen3_5_moe")
