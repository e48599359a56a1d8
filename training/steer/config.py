"""`SteerConfig`: the recipe of `avar-train steer` (learned attention steering). Every SFT key means what it
means there (records, collator, AGTO terms, logging, checkpoints, run folder); the keys below choose which table
entries train, where they start, and how they are held."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional

from avar_ops.core import GROUP_NAMES

from ..config import Problems, existing_file, non_negative
from ..sft.config import SFTConfig

__all__ = ["SteerConfig", "INIT_MODES"]

INIT_MODES = ("weights", "logits", "bias")


@dataclass
class SteerConfig(SFTConfig):
    # A table entry moves by O(learning_rate) per step under Adam: a logit offset needs steps of 1e-2, not 1e-5.
    learning_rate: float = 0.05  # AdamW's, on the tables (SFT's default, 1e-5, would leave them where they start)
    # which entries train (the others stay at their initial value)
    train_logit_scale: bool = True  # false: only the bias β trains (γ stays at its initial value)
    steer_layers: Optional[List[int]] = None  # decoder layers whose tables train (default all)
    steer_heads: Optional[List[int]] = None  # query heads whose rows train (default all)
    steer_groups: Optional[List[str]] = None  # key groups whose columns train: other, visual, system, user (all)
    # where the tables start: identity (β = 0, γ = 1), a training-free intervention, or a steering file
    init_mode: str = "weights"  # how init_img / init_sys are read, as `avar generate --mode`
    init_img: float = 0.0  # α_img (weights, logits) or β_img (bias); 0.15 is the paper's intervention
    init_sys: float = 0.0  # α_sys (weights, logits) or β_sys (bias)
    init_steering: Optional[str] = None  # start from this steering file's tables (excludes init_img / init_sys)
    # regularisation: loss += l2_bias · mean(β²) + l2_logit_scale · mean((γ − 1)²) over the trained entries
    l2_bias: float = 0.0  # weight of mean(β²) over the trained entries: a pull toward zero bias
    l2_logit_scale: float = 0.0  # weight of mean((γ − 1)²) over the trained entries: a pull toward unit scale
    # bounds, applied after every optimizer step (and checked on the initial tables)
    max_abs_bias: float = 10.0  # |β| ≤ this after every step
    logit_scale_min: float = 0.0  # γ ≥ this after every step
    logit_scale_max: float = 4.0  # γ ≤ this after every step

    def problems(self) -> Problems:
        p = super().problems()
        if self.weight_decay:
            p.add(
                "weight_decay",
                f"must be 0 for steering, got {self.weight_decay} (AdamW's decay pulls γ toward 0, not 1); use "
                "l2_bias / l2_logit_scale, which pull toward zero bias / unit scale",
            )
        if self.deepspeed is not None:
            p.add(
                "deepspeed",
                "steering trains only the tables (a few thousand numbers) and keeps no gradient or optimizer state "
                "for the weights, so ZeRO has nothing to shard; run without it (data parallel: "
                "training/configs/accelerate_ddp.yaml)",
            )
        if not self.freeze_vision_tower:
            p.add("freeze_vision_tower", "steering freezes every model weight; false would train nothing more")
        for name in ("l2_bias", "l2_logit_scale", "max_abs_bias", "logit_scale_min"):
            non_negative(p, self, name)
        if not p.has("max_abs_bias") and self.max_abs_bias == 0:
            p.add("max_abs_bias", "must be > 0 (0 would hold every bias at 0)")
        if not (isinstance(self.logit_scale_max, float) and math.isfinite(self.logit_scale_max)) or (
            not p.has("logit_scale_min") and self.logit_scale_max <= self.logit_scale_min
        ):
            p.add(
                "logit_scale_max",
                f"must be a finite number above logit_scale_min ({self.logit_scale_min}), got {self.logit_scale_max}",
            )
        if self.steer_groups is not None:
            unknown = [g for g in self.steer_groups if g not in GROUP_NAMES]
            if unknown or not self.steer_groups:
                p.add(
                    "steer_groups", f"must be null or a non-empty list of {list(GROUP_NAMES)}, got {self.steer_groups}"
                )
        for name in ("steer_layers", "steer_heads"):
            if getattr(self, name) is not None and not getattr(self, name):
                # The range (−n ≤ i < n) is checked against the model before the run.
                p.add(name, "must be null (all) or a non-empty list of indices, got []")
        if self.init_mode not in INIT_MODES:
            p.add("init_mode", f"must be one of {', '.join(INIT_MODES)}, got {self.init_mode!r}")
        for name in ("init_img", "init_sys"):
            if not math.isfinite(getattr(self, name)):
                p.add(name, f"must be a finite number, got {getattr(self, name)}")
        if self.init_steering is not None:
            existing_file(p, self.init_steering, "init_steering")
            if self.init_img or self.init_sys:
                p.add("init_steering", "starts from a file's tables; leave init_img and init_sys at 0 with it")
        if not p.has("init_mode") and not p.has("init_img") and not p.has("init_sys"):
            try:
                iv = self.init_intervention()
            except (TypeError, ValueError) as exc:
                p.add("init_img", str(exc))
            else:
                bounds = ("max_abs_bias", "logit_scale_min", "logit_scale_max")
                if iv is not None and not any(p.has(b) for b in bounds):
                    reason = self.outside_bounds(iv.group_bias(), iv.group_logit_scale())
                    if reason:
                        p.add("init_img", f"the initial tables of {iv.describe()} {reason}")
        if self.init_steering is not None and os.path.isdir(self.init_steering):
            p.add("init_steering", f"{self.init_steering!r} is a folder; expected a steering .safetensors file")
        return p

    def outside_bounds(self, bias, logit_scale) -> str:
        """Why tables with these entries lie outside the bounds ("" when they do not)."""
        bias, logit_scale = [float(v) for v in bias], [float(v) for v in logit_scale]
        top = max(abs(v) for v in bias)
        if top > self.max_abs_bias:
            return f"have |β| up to {top:.4g}, above max_abs_bias={self.max_abs_bias}"
        if min(logit_scale) < self.logit_scale_min or max(logit_scale) > self.logit_scale_max:
            return (
                f"have γ in [{min(logit_scale):.4g}, {max(logit_scale):.4g}], outside "
                f"[logit_scale_min, logit_scale_max] = [{self.logit_scale_min}, {self.logit_scale_max}]"
            )
        return ""

    def init_intervention(self):
        """The training-free intervention the tables start from (None: identity or init_steering)."""
        from avar_ops.method import Intervention

        if not self.init_img and not self.init_sys:
            return None
        if self.init_mode == "bias":
            return Intervention(mode="bias", beta_img=self.init_img, beta_sys=self.init_sys)
        return Intervention(mode=self.init_mode, alpha_img=self.init_img, alpha_sys=self.init_sys)

    def summary(self) -> dict:
        """How the tables were trained, for the steering file's metadata (no paths beyond the file names)."""
        keys = (
            "alpha",
            "beta",
            "agto_layers",
            "learning_rate",
            "max_steps",
            "num_train_epochs",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "seed",
            "train_logit_scale",
            "steer_layers",
            "steer_heads",
            "steer_groups",
            "init_mode",
            "init_img",
            "init_sys",
            "l2_bias",
            "l2_logit_scale",
            "max_abs_bias",
            "logit_scale_min",
            "logit_scale_max",
        )
        out = {k: getattr(self, k) for k in keys}
        out["trainer"] = "avar-train steer"
        out["model"] = os.path.basename(os.path.normpath(self.model_name_or_path))
        out["train_file"] = os.path.basename(self.train_file)
        out["init_steering"] = os.path.basename(self.init_steering) if self.init_steering else None
        return out
