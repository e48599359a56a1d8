"""`SFTConfig`: the recipe of `avar-train sft` (cold-start SFT with the AGTO losses); names shared with
`transformers.TrainingArguments` mean the same thing there."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

from ..config import MAX_SEED, Problems, data_format, existing_file, non_negative, positive, positive_float, require

DEFAULT_MIN_PIXELS = 3136  # 56 × 56
DEFAULT_MAX_PIXELS = 1003520  # 28 × 28 × 1280

__all__ = ["SFTConfig"]


@dataclass
class SFTConfig:
    # model and data
    model_name_or_path: str = "tiny"  # a checkpoint folder of a supported family, "tiny" or "tiny:FAMILY"
    train_file: str = ""  # JSONL records with a target (see avar_ops.data.records)
    data_format: str = "auto"  # layout of train_file / eval_file: avar | sharegpt | openai | auto
    eval_file: Optional[str] = None  # held-out records: L_LM, AGTO terms, VAS and image mass, logged as eval_*
    eval_steps: int = 0  # evaluate every N optimizer steps (0: only at the end, when eval_file is set)
    output_dir: str = ""
    skip_bad_records: bool = False  # False: a bad record stops the run; True: skipped into output_dir/rejects.jsonl
    max_length: int = 8192  # token budget per sample; never cuts image tokens
    # Image budget of processors with one (Qwen-VL, GLM-4.1V): None gives 3136 (56 × 56) / 1003520 (28 × 28 × 1280);
    # other families (LLaVA-OneVision, InternVL) keep their processor's sizes and refuse a value.
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
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
    resume: bool = False  # continue the run in output_dir (from its newest whole checkpoint); same settings only
    overwrite: bool = False  # remove the run in output_dir and start again
    report_to: List[str] = field(default_factory=list)  # trackers as TrainingArguments takes them

    def pixels(self, processor=None) -> dict:
        """min_pixels / max_pixels for the collator: the defaults filled in for a processor with a pixel budget
        (or when no processor is given), the values as set otherwise (None: the processor's own sizes)."""
        from ..data.collator import has_pixel_budget

        if processor is not None and not has_pixel_budget(processor):
            return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
        return {
            "min_pixels": DEFAULT_MIN_PIXELS if self.min_pixels is None else self.min_pixels,
            "max_pixels": DEFAULT_MAX_PIXELS if self.max_pixels is None else self.max_pixels,
        }

    def validate(self) -> "SFTConfig":
        """Every value checked on its own and against the others; ConfigError listing all problems found. What
        needs the model, the data or the machine is checked by `avar_train.preflight` before a run."""
        p = Problems()
        require(p, self.train_file, "train_file", "the JSONL file of SFT records")
        require(p, self.output_dir, "output_dir", "the folder checkpoints and logs go to")
        for name in (
            "max_length",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            positive(p, self, name)
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None:
                positive(p, self, name)
        lo, hi = self.pixels().values()
        if not p.has("min_pixels") and not p.has("max_pixels") and lo > hi:
            p.add("min_pixels", f"{lo} must not exceed max_pixels ({hi})")
        for name in ("alpha", "beta", "weight_decay", "warmup_ratio", "max_grad_norm"):
            non_negative(p, self, name)
        positive_float(p, self, "agto_eps")
        positive_float(p, self, "learning_rate")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                p.add(name, f"must be in [0, 1), got {value!r}")
        if not p.has("warmup_ratio") and self.warmup_ratio >= 1:
            p.add("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if not math.isfinite(self.num_train_epochs):
            p.add("num_train_epochs", f"must be a finite number, got {self.num_train_epochs}")
        elif self.max_steps <= 0 and self.num_train_epochs <= 0:
            p.add("max_steps", "set max_steps > 0 or num_train_epochs > 0")
        if self.save_steps < 0:
            p.add("save_steps", f"must be >= 0, got {self.save_steps}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            p.add("save_total_limit", f"must be null or >= 1, got {self.save_total_limit}")
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_SEED:
                p.add(name, f"must be in [0, {MAX_SEED}] (2**32 - 1), got {value}")
        cpus = os.cpu_count() or 1
        if not 0 <= self.dataloader_num_workers <= cpus:
            # Each worker is a process; more of them than CPUs only adds processes.
            p.add(
                "dataloader_num_workers", f"must be in [0, {cpus}] (the CPUs here), got {self.dataloader_num_workers}"
            )
        if self.lr_scheduler_type not in ("constant", "constant_with_warmup", "linear", "cosine"):
            p.add(
                "lr_scheduler_type",
                f"must be constant, constant_with_warmup, linear or cosine, got {self.lr_scheduler_type!r}",
            )
        if self.agto_empty not in ("error", "skip"):
            p.add("agto_empty", f"must be 'error' or 'skip', got {self.agto_empty!r}")
        if self.agto_layers is not None and not self.agto_layers:
            # The range (−n ≤ i < n) is checked against the model's layer count before the run.
            p.add("agto_layers", "must be null (all layers) or a non-empty list of layer indices, got []")
        if self.overwrite and (self.resume or self.resume_from_checkpoint):
            p.add("overwrite", "overwrite=true starts the run again; it excludes resume and resume_from_checkpoint")
        if self.use_cpu and self.deepspeed:
            p.add("use_cpu", "use_cpu disables DeepSpeed; leave it false with a deepspeed config")
        if self.ddp_backend not in (None, "gloo", "nccl", "mpi", "ccl", "hccl", "cncl", "mccl"):
            p.add("ddp_backend", f"must be null or a torch.distributed backend, got {self.ddp_backend!r}")
        existing_file(p, self.train_file, "train_file")
        data_format(p, self.data_format)
        if self.eval_steps < 0:
            p.add("eval_steps", f"must be >= 0, got {self.eval_steps}")
        if self.eval_steps and not self.eval_file:
            p.add("eval_steps", f"{self.eval_steps} needs eval_file, the held-out records to evaluate on")
        if self.eval_file is not None:
            existing_file(p, self.eval_file, "eval_file")
        if self.deepspeed is not None:
            existing_file(p, self.deepspeed, "deepspeed")
        from avar_ops.analysis import ModelSpecError, tiny_family

        try:
            tiny = tiny_family(self.model_name_or_path)
        except ModelSpecError as exc:
            p.add("model_name_or_path", str(exc))
        else:
            if tiny is None and not os.path.isdir(self.model_name_or_path):
                p.add(
                    "model_name_or_path",
                    f"must be 'tiny', 'tiny:FAMILY' or a local checkpoint folder, got {self.model_name_or_path!r} "
                    "(no such folder; nothing is downloaded)",
                )
        p.raise_any()
        return self
