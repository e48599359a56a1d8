"""GRPO with the visual-anchored reward (VARS): the recipe (`config`), the trainer (`trainer`), the clipped
policy loss (`loss`) and the rewards (`rewards`)."""
