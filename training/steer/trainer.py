"""Learned attention steering: train only the per-(layer, head, group) bias β and logit scale γ tables of a
frozen Qwen2.5-VL, with the SFT run around it (records, collator, AGTO terms, logging, checkpoints, run folder).

    L = L_LM + α·L_enhance_img + β_AGTO·L_suppress_sys + l2_bias·mean(β²) + l2_logit_scale·mean((γ − 1)²)

Every model weight has requires_grad False; the tables are the parameters of a small module attached to the
model (so that Trainer's optimizer, gradient clipping and data-parallel gradient reduction see them and nothing
else). Entries outside the chosen layers / heads / groups keep their initial value: their gradient is zeroed
before it reaches the optimizer, so Adam never moves them. After every optimizer step the tables are clamped
into their bounds (|β| ≤ max_abs_bias, logit_scale_min ≤ γ ≤ logit_scale_max).

A checkpoint is a steering file (`avar_ops.hf.save_steering`) plus Trainer's optimizer, scheduler and state;
the run's result is output_dir/steering.safetensors. The tables are handed to the patch at every step (and
evaluation), after Trainer has placed the model on its device, so the patch always reads the live parameters.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from transformers import TrainerCallback

from avar_ops.core import GROUP_NAMES, NUM_GROUPS, select_indices
from avar_ops.hf import get_handle, load_steering, model_steering_shape, save_steering

from ..config import ConfigError
from ..sft.trainer import AGTOTrainer, train_sft

__all__ = ["STEERING_FILE", "SteeringTables", "SteeringTrainer", "steering_tables_for", "train_steer"]

STEERING_FILE = "steering.safetensors"
MODULE_NAME = "avar_steering"


class SteeringTables(torch.nn.Module):
    """The trainable tables: bias and logit_scale float32 [L, H, 4] with masks of the entries that train."""

    def __init__(
        self,
        bias: torch.Tensor,  # [L, H, 4]
        logit_scale: torch.Tensor,  # [L, H, 4]
        trainable: torch.Tensor,  # bool [L, H, 4]: entries that move
        train_logit_scale: bool = True,
        bounds: tuple = (10.0, 0.0, 4.0),  # (max |β|, min γ, max γ)
    ):
        super().__init__()
        self.bias = torch.nn.Parameter(bias.detach().clone().float())
        self.logit_scale = torch.nn.Parameter(logit_scale.detach().clone().float(), requires_grad=train_logit_scale)
        self.register_buffer("bias_mask", trainable.clone().bool(), persistent=False)
        self.register_buffer("scale_mask", (trainable & train_logit_scale).clone().bool(), persistent=False)
        self.bounds = tuple(float(b) for b in bounds)
        # Zero the gradient of the held entries before it is accumulated (and reduced across processes).
        self.bias.register_hook(lambda g: g * self.bias_mask.to(g.dtype))
        if train_logit_scale:
            self.logit_scale.register_hook(lambda g: g * self.scale_mask.to(g.dtype))

    def num_trainable(self) -> int:
        return int(self.bias_mask.sum()) + int(self.scale_mask.sum())

    def penalty(self, l2_bias: float, l2_logit_scale: float) -> torch.Tensor:
        """l2_bias·mean(β²) + l2_logit_scale·mean((γ − 1)²) over the trained entries (0 without any)."""
        total = self.bias.new_zeros(())
        if l2_bias and bool(self.bias_mask.any()):
            total = total + l2_bias * self.bias[self.bias_mask].square().mean()
        if l2_logit_scale and bool(self.scale_mask.any()):
            total = total + l2_logit_scale * (self.logit_scale[self.scale_mask] - 1).square().mean()
        return total

    @torch.no_grad()
    def project(self) -> None:
        """Clamp the tables into their bounds (after an optimizer step)."""
        max_bias, min_scale, max_scale = self.bounds
        self.bias.clamp_(-max_bias, max_bias)
        self.logit_scale.clamp_(min_scale, max_scale)


def steering_tables_for(model, cfg) -> SteeringTables:
    """The initial tables of `cfg` (a `SteerConfig`) for `model`: identity, a training-free intervention, or a
    steering file; the entries of steer_layers × steer_heads × steer_groups train."""
    from avar_ops.method import patch_tables

    shape = model_steering_shape(model)
    # One row per softmax-attention layer (what the patch's tables and steer_layers count).
    num_layers, num_heads = len(shape["attention_layers"]), shape["num_heads"]
    bias = torch.zeros(num_layers, num_heads, NUM_GROUPS)  # [L, H, 4]
    scale = torch.ones(num_layers, num_heads, NUM_GROUPS)  # [L, H, 4]
    if cfg.init_steering:
        start = load_steering(cfg.init_steering)
        start.check_fits(**shape)
        bias, scale = start.layer_tables()
    else:
        tables = patch_tables(model, cfg.init_intervention())
        if tables.get("bias") is not None:
            bias = tables["bias"].float()
        if tables.get("logit_scale") is not None:
            scale = tables["logit_scale"].float()
    max_bias, lo, hi = cfg.max_abs_bias, cfg.logit_scale_min, cfg.logit_scale_max
    reason = cfg.outside_bounds(bias.flatten().tolist(), scale.flatten().tolist())
    if reason:
        raise ConfigError(f"the initial tables {reason}")
    layers = select_indices(cfg.steer_layers, num_layers, "steer_layers")
    heads = select_indices(cfg.steer_heads, num_heads, "steer_heads")
    groups = None if cfg.steer_groups is None else [GROUP_NAMES.index(g) for g in cfg.steer_groups]
    keep_l = torch.zeros(num_layers, dtype=torch.bool)
    keep_l[layers if layers is not None else slice(None)] = True
    keep_h = torch.zeros(num_heads, dtype=torch.bool)
    keep_h[heads if heads is not None else slice(None)] = True
    keep_g = torch.zeros(NUM_GROUPS, dtype=torch.bool)
    keep_g[groups if groups is not None else slice(None)] = True
    trainable = keep_l[:, None, None] & keep_h[None, :, None] & keep_g[None, None, :]  # [L, H, 4]
    return SteeringTables(bias, scale, trainable, cfg.train_logit_scale, (max_bias, lo, hi))


class _Project(TrainerCallback):
    def __init__(self, tables: SteeringTables):
        self.tables = tables

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.tables.project()


class SteeringTrainer(AGTOTrainer):
    """`AGTOTrainer` over a frozen model whose only parameters in training are its `SteeringTables`.

    `tables`: the module attached to the model; `l2`: (l2_bias, l2_logit_scale); `summary`: the recipe's
    summary for the steering files' metadata.
    """

    def __init__(self, *args, tables: SteeringTables, l2=(0.0, 0.0), summary: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tables = tables
        self.l2 = tuple(float(v) for v in l2)
        self.summary = dict(summary or {})
        self._handle = get_handle(self._patched)
        weights = [n for n, p in self._patched.named_parameters() if p.requires_grad and not n.startswith(MODULE_NAME)]
        if weights:
            raise RuntimeError(f"SteeringTrainer: model weights still require grad: {weights[:3]}")
        self.add_callback(_Project(tables))

    def _bind(self) -> None:
        """Hand the live tables to the patch (views into the parameters, on the device the model is on)."""
        self._handle.set_bias(bias=self.tables.bias, logit_scale=self.tables.logit_scale)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._bind()
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, rest = (out[0], out[1:]) if return_outputs else (out, ())
        if any(self.l2) and model.training:  # eval_loss stays L_LM + the AGTO terms, as SFT's
            loss = loss + self.tables.penalty(*self.l2).to(loss.dtype)
        return (loss, *rest) if return_outputs else loss

    def _shape(self) -> dict:
        return model_steering_shape(self._patched, getattr(self._handle, "attention_layers", None))

    def steering_kwargs(self) -> dict:
        return {**self._shape(), "trained": {**self.summary, "step": self.state.global_step}}

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """The checkpoint's (and the run's) model file is the steering file; the frozen weights are not saved."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_steering(
            os.path.join(output_dir, STEERING_FILE),
            self.tables.bias.detach().cpu(),
            self.tables.logit_scale.detach().cpu(),
            **self.steering_kwargs(),
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        path = os.path.join(resume_from_checkpoint, STEERING_FILE)
        steering = load_steering(path)
        steering.check_fits(**self._shape())
        bias, scale = steering.layer_tables()
        with torch.no_grad():
            self.tables.bias.copy_(bias.to(self.tables.bias.device))
            self.tables.logit_scale.copy_(scale.to(self.tables.logit_scale.device))


def train_steer(cfg, records=None) -> SteeringTrainer:
    """Run `avar-train steer` as `cfg` (a `SteerConfig`) says; returns the finished trainer. The learned tables
    are in cfg.output_dir/steering.safetensors."""
    holder = {}

    def prepare(model):
        for p in model.parameters():
            p.requires_grad_(False)
        tables = steering_tables_for(model, cfg)
        model.add_module(MODULE_NAME, tables)
        holder["tables"] = tables

    def trainer_class(*args, **kwargs):
        return SteeringTrainer(
            *args,
            tables=holder["tables"],
            l2=(cfg.l2_bias, cfg.l2_logit_scale),
            summary=cfg.summary(),
            **kwargs,
        )

    return train_sft(cfg, records, trainer_class=trainer_class, prepare=prepare, command="steer")
