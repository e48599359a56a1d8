"""avar_train: attention-guided training of Qwen2.5-VL on avar's fused attention.

Records and collation (`records`, `collator`), YAML configs (`config`), cold-start SFT with the AGTO losses
(`sft`), VARD data synthesis (`vard`), GRPO with the visual-anchored reward (`grpo`); `avar-train` is the command
line (`cli`). Built on the public API of `avar_ops` only.
"""
