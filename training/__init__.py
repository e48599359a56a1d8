"""avar_train: attention-guided training of Qwen2.5-VL on avar's fused attention.

    data/   collation of the records of `avar_ops.data` into model batches (`collator`), VARD data synthesis
            (`vard`, its recipe `vard_config`, its prompt `templates/`)
    sft/    cold-start SFT with the AGTO losses: the recipe (`config`) and the trainer (`trainer`)
    grpo/   GRPO with the visual-anchored reward: recipe, trainer, policy loss, rewards
    config  the YAML loader and value checks the recipes share
    preflight  what every command checks before a model loads (`avar-train check`)
    cli     `avar-train` (also `python -m avar_train.cli`)

Built on the public API of `avar_ops` only; inside the package, modules import each other relatively.
"""
