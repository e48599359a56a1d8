"""avar_train: attention-guided training on top of avar_ops (cold-start SFT with AGTO, VARD synthesis, GRPO
with the visual reward)."""
