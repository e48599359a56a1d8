"""GLM-4.1V and GLM-4.5V: a GQA text decoder with 3D RoPE over half of each head (GLM-4.5V's with routed experts
after its first layers; attention is the same), `<|system|>` / `<|user|>` / `<|assistant|>` turns with no closing
token, `<|begin_of_image|><|image|>…<|end_of_image|>` images, and videos whose frames are image blocks (of the
same `<|image|>` token) between `<|begin_of_video|>` and `<|end_of_video|>`.

Both follow the common layout (`model.model.language_model.layers[i].self_attn`, every layer softmax attention
through transformers' attention interface), so nothing is overridden.
"""

from avar_ops.hf.families.base import Family


class Glm4v(Family):
    name = "glm4v"
    title = "GLM-4.1V"
    model_types = ("glm4v",)


class Glm4vMoe(Family):
    name = "glm4v_moe"
    title = "GLM-4.5V"
    model_types = ("glm4v_moe",)
