"""The GRPO recipe: one dataclass, read from YAML, every value checked; an unknown key is an error.

Names shared with TRL's GRPOConfig mean the same thing here (learning_rate, num_generations, temperature, top_p,
max_completion_length, num_iterations, epsilon, epsilon_high, beta, loss_type, scale_rewards, reward_weights, …),
so a recipe moves between the two. Differences, stated: `per_device_train_batch_size` counts rollouts and must
be a multiple of `num_generations` (each process holds whole groups, so advantages need no communication), and
`max_steps` counts rollout batches (each one followed by `num_iterations` optimizer updates).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..config import MAX_SEED, ConfigError, Problems, data_format, load_config

__all__ = ["GRPOConfig", "load_grpo_config"]


@dataclass
class GRPOConfig:
    # model and data
    model_name_or_path: str = "tiny"  # a checkpoint folder of a supported family, "tiny" or "tiny:FAMILY"
    train_file: str = ""  # JSONL records (avar_ops.data.records, use "rl"): prompt, images and the reference answer
    data_format: str = "auto"  # layout of train_file / eval_file: avar | sharegpt | openai | auto
    eval_file: Optional[str] = None  # held-out records: greedy accuracy and VAS, logged as eval_*
    eval_steps: int = 0  # evaluate every N steps (0: only at the end, when eval_file is set)
    output_dir: str = ""
    skip_bad_records: bool = False
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    max_prompt_length: Optional[int] = None  # tokens; a longer prompt is an error naming the record
    freeze_vision_tower: bool = True  # the vision tower's weights stay as they are (the paper trains the LLM)
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    # optimisation
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "constant"  # constant | linear | cosine
    warmup_ratio: float = 0.0
    max_steps: int = 1
    per_device_train_batch_size: int = 8
    # rollouts
    num_generations: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    max_completion_length: int = 256
    # loss
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    beta: float = 0.0
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    # rewards
    lambda_visual: float = 0.3
    lambda_format: float = 0.1
    visual_reward_max: Optional[float] = None  # cap on each rollout's r_visual (after the kind below)
    # r_visual's definition (avar_ops.method.visual_reward): ratio (the paper's Eq. 5) | capped_ratio (each
    # per-token, per-layer term capped at visual_reward_cap) | ratio_of_sums | image_mass
    visual_reward: str = "ratio"
    visual_reward_cap: Optional[float] = None
    visual_layers: Optional[List[int]] = None  # decoder layers r_visual averages over (default all)
    visual_eps: float = 1e-6
    format_pattern: Optional[str] = None  # default: <think>…</think><answer>…</answer>
    accuracy_checker: Optional[str] = None  # "module:function" (completions, references) -> statuses
    reward_funcs: List[str] = field(default_factory=list)  # extra TRL-style reward functions, "module:function"
    reward_weights: Optional[List[float]] = None  # one per reward_funcs entry (default 1.0 each)
    # bookkeeping
    logging_steps: int = 1
    save_steps: int = 0  # 0: only at the end
    resume_from_checkpoint: Optional[str] = None  # a checkpoint folder, or "latest" in output_dir
    resume: bool = False  # continue the run in output_dir (from its newest whole checkpoint); same settings only
    overwrite: bool = False  # remove the run in output_dir and start again
    report_to: List[str] = field(default_factory=list)  # accelerate trackers, e.g. ["tensorboard"]

    def validate(self) -> "GRPOConfig":
        p = Problems()

        def fail(key, want):
            p.add(key, f"must be {want}, got {getattr(self, key)!r:.80}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)

        for key in ("model_name_or_path", "train_file", "output_dir"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                fail(key, "a non-empty string")
        for key in (
            "max_steps",
            "per_device_train_batch_size",
            "num_generations",
            "max_completion_length",
            "num_iterations",
            "logging_steps",
        ):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                fail(key, "an int >= 1")
        for key in ("save_steps", "eval_steps"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 0:
                fail(key, "an int >= 0")
        if not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            fail("seed", f"an int in [0, {MAX_SEED}] (2**32 - 1)")
        data_format(p, self.data_format)
        if self.eval_file is not None and (not isinstance(self.eval_file, str) or not self.eval_file):
            fail("eval_file", "null or a path")
        if is_int(self.eval_steps) and self.eval_steps and self.eval_file is None:
            fail("eval_steps", "0 without eval_file (the held-out records to evaluate on)")
        for key in ("min_pixels", "max_pixels", "max_prompt_length", "top_k"):
            v = getattr(self, key)
            if v is not None and (not is_int(v) or v < 1):
                fail(key, "null or an int >= 1")
        if (
            not p.has("min_pixels")
            and not p.has("max_pixels")
            and self.min_pixels
            and self.max_pixels
            and self.min_pixels > self.max_pixels
        ):
            fail("min_pixels", f"<= max_pixels ({self.max_pixels})")
        for key in ("learning_rate", "temperature"):
            if not is_num(getattr(self, key)) or getattr(self, key) <= 0:
                fail(key, "a number > 0")
        for key in (
            "weight_decay",
            "max_grad_norm",
            "epsilon",
            "beta",
            "lambda_visual",
            "lambda_format",
            "warmup_ratio",
        ):
            if not is_num(getattr(self, key)) or getattr(self, key) < 0:
                fail(key, "a number >= 0")
        for key in ("adam_beta1", "adam_beta2", "top_p"):
            v = getattr(self, key)
            if not is_num(v) or not 0 < v <= 1 or (key != "top_p" and v == 1):
                fail(key, "a number in (0, 1)" if key != "top_p" else "a number in (0, 1]")
        if not p.has("warmup_ratio") and self.warmup_ratio > 1:
            fail("warmup_ratio", "in [0, 1]")
        for key in ("epsilon_high", "visual_reward_max"):
            v = getattr(self, key)
            if v is not None and (not is_num(v) or v <= 0):
                fail(key, "null or a number > 0")
        from avar_ops.method import VISUAL_REWARDS

        if self.visual_reward not in VISUAL_REWARDS:
            fail("visual_reward", f"one of {', '.join(VISUAL_REWARDS)}")
        if self.visual_reward == "capped_ratio":
            if not is_num(self.visual_reward_cap) or self.visual_reward_cap <= 0:
                fail("visual_reward_cap", "a number > 0 with visual_reward = capped_ratio")
            else:
                self.visual_reward_cap = float(self.visual_reward_cap)
        elif self.visual_reward_cap is not None:
            fail("visual_reward_cap", f"null unless visual_reward = capped_ratio (it is {self.visual_reward!r})")
        if not is_num(self.visual_eps) or self.visual_eps <= 0:
            fail("visual_eps", "a number > 0")
        else:
            self.visual_eps = float(self.visual_eps)
        if self.lr_scheduler_type not in ("constant", "linear", "cosine"):
            fail("lr_scheduler_type", "one of constant, linear, cosine")
        if self.loss_type not in ("grpo", "dr_grpo", "dapo"):
            fail("loss_type", "one of grpo, dr_grpo, dapo")
        if self.scale_rewards not in ("group", "batch", "none"):
            fail("scale_rewards", "one of group, batch, none")
        if not p.has("num_generations") and self.num_generations < 2:
            # One rollout per prompt has a zero advantage whatever the scaling: the run would train nothing.
            fail("num_generations", ">= 2 (GRPO learns from the differences within a group of rollouts)")
        elif not p.has("per_device_train_batch_size") and self.per_device_train_batch_size % self.num_generations:
            fail("per_device_train_batch_size", f"a multiple of num_generations ({self.num_generations})")
        # The range (−n ≤ i < n) is checked against the model's layer count before the run.
        if self.visual_layers is not None and (
            not isinstance(self.visual_layers, list)
            or not self.visual_layers
            or not all(map(is_int, self.visual_layers))
        ):
            fail("visual_layers", "null (all layers) or a non-empty list of layer indices")
        for key in ("reward_funcs", "report_to"):
            v = getattr(self, key)
            if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
                fail(key, "a list of strings")
        if (
            not p.has("reward_funcs")
            and self.reward_weights is not None
            and (
                not isinstance(self.reward_weights, list)
                or len(self.reward_weights) != len(self.reward_funcs)
                or not all(is_num(w) for w in self.reward_weights)
            )
        ):
            fail("reward_weights", f"null or a list of {len(self.reward_funcs)} numbers (one per reward_funcs)")
        for key in ("format_pattern", "accuracy_checker", "resume_from_checkpoint"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, str) or not v):
                fail(key, "null or a non-empty string")
        for key in ("skip_bad_records", "freeze_vision_tower", "bf16", "gradient_checkpointing", "resume", "overwrite"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "true or false")
        if self.overwrite and (self.resume or self.resume_from_checkpoint):
            p.add("overwrite", "overwrite=true starts the run again; it excludes resume and resume_from_checkpoint")
        p.raise_any()
        return self


def load_grpo_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> GRPOConfig:
    """The recipe in the YAML file `path` (read as every avar-train config: paths in the file relative to it) with
    `overrides` applied, validated; without a file, the defaults with the overrides."""
    if path is not None:
        return load_config(GRPOConfig, path, overrides)
    values = dict(overrides or {})
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(GRPOConfig)})
    if unknown:
        raise ConfigError(f"unknown keys {unknown} for GRPOConfig")
    return GRPOConfig(**values).validate()
