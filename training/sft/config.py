"""`SFTConfig`: the recipe of `avar-train sft` (cold-start SFT with the AGTO losses); names shared with
`transformers.TrainingArguments` mean the same thing there."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from ..config import ConfigError, data_format, existing_file, non_negative, positive, positive_float, require

__all__ = ["SFTConfig"]


@dataclass
class SFTConfig:
    # model and data
    model_name_or_path: str = "tiny"  # a local Qwen2.5-VL checkpoint folder, or "tiny" (the embedded random model)
    train_file: str = ""  # JSONL records with a target (see avar_ops.data.records)
    data_format: str = "auto"  # layout of train_file / eval_file: avar | sharegpt | openai | auto
    eval_file: Optional[str] = None  # held-out records: L_LM, AGTO terms, VAS and image mass, logged as eval_*
    eval_steps: int = 0  # evaluate every N optimizer steps (0: only at the end, when eval_file is set)
    output_dir: str = ""
    skip_bad_records: bool = False  # False: a bad record stops the run; True: skipped into output_dir/rejects.jsonl
    max_length: int = 8192  # token budget per sample; never cuts image tokens
    min_pixels: int = 3136  # 56 × 56
    max_pixels: int = 1003520  # 28 × 28 × 1280
    freeze_vision_tower: bool = True
    # AGTO: L = L_LM + alpha·L_enhance_img + beta·L_suppress_sys
    alpha: float = 0.15
    beta: float = 0.15
    agto_eps: float = 1e-6
    agto_layers: Optional[List[int]] = None  # decoder layers whose masses enter the losses (default all)
    agto_empty: str = "error"  # a sample without image/system/user tokens: "error", or "skip" it in the AGTO terms
    # optimisation (TrainingArguments names)
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    bf16: bool = False
    gradient_checkpointing: bool = False  # always non-reentrant: reentrant checkpointing loses the mass gradients
    deepspeed: Optional[str] = None  # a DeepSpeed JSON config (training/configs/zero2.json, zero3.json)
    seed: int = 0
    data_seed: Optional[int] = None
    dataloader_num_workers: int = 0
    use_cpu: bool = False  # CPU-only data parallelism (torchrun on CPU); leave false under DeepSpeed
    ddp_backend: Optional[str] = None  # e.g. gloo on CPU, nccl on GPU (default: the device's)
    # bookkeeping
    logging_steps: int = 1
    save_steps: int = 0  # 0: save only at the end
    save_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None  # a checkpoint folder, or "latest" (the newest in output_dir)
    report_to: List[str] = field(default_factory=list)  # trackers as TrainingArguments takes them

    def validate(self) -> "SFTConfig":
        require(self.train_file, "train_file", "the JSONL file of SFT records")
        require(self.output_dir, "output_dir", "the folder checkpoints and logs go to")
        for name in (
            "max_length",
            "min_pixels",
            "max_pixels",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            positive(self, name)
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        for name in ("alpha", "beta", "weight_decay", "warmup_ratio", "max_grad_norm"):
            non_negative(self, name)
        positive_float(self, "agto_eps")
        positive_float(self, "learning_rate")
        if self.warmup_ratio >= 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set max_steps > 0 or num_train_epochs > 0")
        if self.save_steps < 0:
            raise ConfigError(f"save_steps must be >= 0, got {self.save_steps}")
        if self.lr_scheduler_type not in ("constant", "constant_with_warmup", "linear", "cosine"):
            raise ConfigError(
                f"lr_scheduler_type must be constant, constant_with_warmup, linear or cosine, "
                f"got {self.lr_scheduler_type!r}"
            )
        if self.agto_empty not in ("error", "skip"):
            raise ConfigError(f"agto_empty must be 'error' or 'skip', got {self.agto_empty!r}")
        # Indices follow the one rule of avar_ops.core.select_indices (-n <= i < n); the range is checked
        # against the model's layer count once it is loaded.
        if self.agto_layers is not None and not self.agto_layers:
            raise ConfigError("agto_layers must be null (all layers) or a non-empty list of layer indices, got []")
        if self.use_cpu and self.deepspeed:
            raise ConfigError("use_cpu disables DeepSpeed; leave it false with a deepspeed config")
        if self.ddp_backend not in (None, "gloo", "nccl", "mpi", "ccl", "hccl", "cncl", "mccl"):
            raise ConfigError(f"ddp_backend must be null or a torch.distributed backend, got {self.ddp_backend!r}")
        existing_file(self.train_file, "train_file")
        data_format(self.data_format)
        if self.eval_steps < 0:
            raise ConfigError(f"eval_steps must be >= 0, got {self.eval_steps}")
        if self.eval_steps and not self.eval_file:
            raise ConfigError(f"eval_steps={self.eval_steps} needs eval_file, the held-out records to evaluate on")
        if self.eval_file is not None:
            existing_file(self.eval_file, "eval_file")
        if self.deepspeed is not None:
            existing_file(self.deepspeed, "deepspeed")
        if self.model_name_or_path != "tiny" and not os.path.isdir(self.model_name_or_path):
            raise ConfigError(
                f"model_name_or_path must be 'tiny' or a local checkpoint folder, got {self.model_name_or_path!r} "
                "(no such folder; nothing is downloaded)"
            )
        return self
