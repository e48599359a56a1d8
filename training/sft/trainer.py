"""Cold-start SFT with the AGTO losses on `transformers.Trainer`: L = L_LM + α·L_enhance_img + β·L_suppress_sys.

The model runs through the avar patch, so each decoder layer's attention returns the per-group masses of every
query from the fused kernel. During the forward, each layer's masses [B, H, L, 4] are reduced on the spot to
what the step needs, per sample: the mean mass over the user-turn query tokens [B, H, 1, 4] (which carries the
gradient: the AGTO losses of `avar_ops.method.agto_losses` depend on the masses only through Σ_{q∈Q} mass_q),
and the detached per-sample VAS and image mass for the logs. No per-token tensor outlives its layer, so memory
stays linear in L whatever the number of layers.

Guarantees:
- the attention loss never goes missing: a step whose forward did not produce the masses of every layer is an
  error (`collect_masses` checks it), and so is a step whose masses carry no gradient while the loss needs
  them (what reentrant activation checkpointing does: its first forward runs without autograd);
- gradient checkpointing is non-reentrant (the collector stays open through backward, so recomputation sees
  the same attention calls, and the masses kept are the first forward's, which autograd ties to the
  recomputed ones);
- logged per optimizer step (averaged over the micro-batches and processes since the last log): loss_lm,
  loss_enhance_img, loss_suppress_sys, vas (paper's Eq. 1 over all layers, heads and user tokens) and
  image_mass (the user tokens' mean attention on image tokens);
- with `eval_file`, the same terms on the held-out records every `eval_steps` steps and after the last one,
  logged as eval_loss (L_LM + the weighted AGTO terms), eval_loss_lm, eval_loss_enhance_img, … .

Gradient accumulation: each micro-batch's loss is its own token mean (L_LM) and sample means (AGTO terms), and
Trainer divides it by the number of accumulation steps (`model_accepts_loss_kwargs` is off).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
from transformers import Trainer, TrainerCallback

from avar_ops.core import select_indices
from avar_ops.data import finish_checkpoint, latest_checkpoint, staging_folder, truncate_log
from avar_ops.hf import collect_masses, get_handle
from avar_ops.method import agto_losses, vas

from ..config import ConfigError
from ..interrupt import Interrupted, StopRequest

__all__ = ["AGTOSettings", "AGTOTrainer", "Interrupted", "LaunchError", "LOG_KEYS", "train_sft"]

LOG_KEYS = ("loss_lm", "loss_enhance_img", "loss_suppress_sys", "vas", "image_mass", "agto_samples")
_GROUP_MASKS = ("key_group", "user_mask", "image_mask", "system_mask", "response_mask")


class LaunchError(RuntimeError):
    """The processes were launched in a way the run cannot use (found before any model is loaded)."""


@dataclass(frozen=True)
class AGTOSettings:
    alpha: float = 0.15
    beta: float = 0.15
    eps: float = 1e-6
    layers: Optional[List[int]] = None  # decoder layers in the losses; None: all
    # A sample without user, image or system tokens has no AGTO term: "error" stops the run, "skip" leaves it out
    # of the attention terms (it still trains L_LM) and the logged agto_samples shows the share that entered.
    empty: str = "error"


class _MeanOverQueries(torch.autograd.Function):
    """mass [B, H, L, 4] -> its mean over each sample's query tokens, [B, H, 1, 4].

    A custom function because it runs inside the decoder layer, i.e. inside a non-reentrant checkpoint region,
    but only in the first forward (the recomputation keeps the first forward's reductions): it must save no
    tensor through autograd, or the checkpoint would count different saved tensors in the two runs. The
    weights it needs are constants and live on ctx as plain attributes.
    """

    @staticmethod
    def forward(ctx, mass, weight):  # mass [B, H, L, 4], weight [B, L] (1/|Q| on query tokens, 0 elsewhere)
        ctx.weight = weight
        return torch.einsum("bhlg,bl->bhg", mass, weight).unsqueeze(2)  # [B, H, 1, 4]

    @staticmethod
    def backward(ctx, grad):  # grad [B, H, 1, 4]
        return grad * ctx.weight[:, None, :, None], None  # [B, H, L, 4]


class _LayerReduction:
    """The per-layer reduction handed to `collect_masses`: keeps [B, H, 1, 4] and three [B] values per layer."""

    def __init__(self):
        self.user_mask: Optional[torch.Tensor] = None  # bool [B, L] of the batch being run

    def __call__(self, mass: torch.Tensor):  # mass [B, H, L, 4]
        user = self.user_mask.to(mass.device)  # [B, L]
        weight = user.to(mass.dtype) / user.sum(-1, keepdim=True).clamp(min=1).to(mass.dtype)  # [B, L]
        mean_mass = _MeanOverQueries.apply(mass, weight)  # [B, H, 1, 4]
        stats = vas([mass.detach()], user, empty="skip")
        return mean_mass, stats.vas.per_sample, stats.image_mass.per_sample, stats.valid  # [B,H,1,4], [B], [B], [B]


class AGTOTrainer(Trainer):
    """`Trainer` whose loss adds the AGTO attention terms, computed from the patch's fused masses.

    `model` must be patched (`avar_ops.hf.apply`) and the batches must come from
    `avar_train.data.collator.QwenVLCollator` in "sft" mode (they carry the token groups and masks).
    `log_file`: a JSONL file that gets every log entry (main process only).
    """

    def __init__(self, *args, agto: AGTOSettings, log_file: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.agto = agto
        self.log_file = log_file
        self._patched = self.model
        if agto.empty not in ("error", "skip"):
            raise ValueError(f"AGTOTrainer: agto empty must be 'error' or 'skip', got {agto.empty!r}")
        handle = get_handle(self._patched)
        if handle is None:
            raise RuntimeError("AGTOTrainer: the model is not patched; call avar_ops.hf.apply(model, ...) first")
        num_layers = handle.num_layers  # softmax-attention layers (what agto_layers counts)
        chosen = select_indices(agto.layers, num_layers, "agto_layers")  # −n ≤ i < n, negative from the end
        self._layers = list(range(num_layers)) if chosen is None else chosen
        if self.args.gradient_checkpointing:
            kw = self.args.gradient_checkpointing_kwargs or {}
            if kw.get("use_reentrant", True) is not False:
                raise ValueError(
                    "AGTOTrainer: gradient checkpointing must be non-reentrant "
                    "(gradient_checkpointing_kwargs={'use_reentrant': False}): reentrant checkpointing runs the "
                    "forward without autograd, which would drop the gradients of the attention masses"
                )
        # Each micro-batch loss is a mean of its own; Trainer scales it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._reduction = _LayerReduction()
        self._record = None
        self._sums = torch.zeros(len(LOG_KEYS), dtype=torch.float64)
        self._count = 0
        self._eval_sums = torch.zeros(len(LOG_KEYS), dtype=torch.float64)
        self._eval_count = 0

    # ---------------------------------------------------------------------------------------------- the step

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Open through backward: checkpoint recomputation calls the attention again, and must do so with masses.
        with collect_masses(self._patched, reduce=self._reduction) as record:
            self._record = record
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._record = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        missing = [k for k in _GROUP_MASKS if k not in inputs]
        if missing:
            raise KeyError(f"AGTOTrainer: the batch lacks {missing}; use QwenVLCollator(mode='sft') as the collator")
        masks = {k: inputs.pop(k) for k in _GROUP_MASKS}
        record_ids = inputs.pop("record_ids", None)
        self._reduction.user_mask = masks["user_mask"]
        if self._record is None:  # evaluation or prediction: no backward follows
            with collect_masses(self._patched, reduce=self._reduction) as record:
                outputs = model(**inputs, use_cache=False)
        else:
            record = self._record
            outputs = model(**inputs, use_cache=False)
        per_layer = record.steps[-1] if record.steps else None
        if per_layer is None:
            raise RuntimeError("AGTOTrainer: the forward produced no attention masses (is the model still patched?)")
        lm = outputs.loss
        if lm is None:
            raise RuntimeError("AGTOTrainer: the model returned no LM loss; the batch must carry labels")
        mean_mass = [per_layer[i][0] for i in self._layers]  # each [B, H, 1, 4]
        if (
            torch.is_grad_enabled()
            and (self.agto.alpha or self.agto.beta)
            and not any(m.requires_grad for m in mean_mass)
        ):
            raise RuntimeError(
                "AGTOTrainer: the attention masses carry no gradient in a training step, so the AGTO terms would "
                "silently not train; this is what reentrant gradient checkpointing does: enable it with "
                "gradient_checkpointing_kwargs={'use_reentrant': False}"
            )
        user = masks["user_mask"].to(lm.device)  # [B, L]
        has_query = user.any(-1, keepdim=True)  # [B, 1]: the [B, H, 1, 4] means stand for all user tokens
        if self.agto.empty == "error":
            image_b, system_b = masks["image_mask"].any(-1), masks["system_mask"].any(-1)  # [B] each
            bad = torch.nonzero(~(image_b & system_b & has_query[:, 0].cpu())).flatten().tolist()
            if bad:
                names = [record_ids[b] if record_ids else b for b in bad]
                raise ValueError(
                    f"records {names} lack image, system or user tokens, which the AGTO attention terms measure: "
                    "give them an image, or set agto_empty: skip to train them on L_LM alone"
                )
        terms = agto_losses(
            mean_mass,
            has_query,
            masks["image_mask"].to(lm.device),
            masks["system_mask"].to(lm.device),
            self.agto.eps,
            empty=self.agto.empty,
        )
        enhance, suppress = terms
        loss = lm + self.agto.alpha * enhance.to(lm.dtype) + self.agto.beta * suppress.to(lm.dtype)

        valid = torch.stack([per_layer[i][3] for i in range(len(per_layer))]).all(0)  # [B]
        # The logged VAS and image mass describe the samples the AGTO terms trained on: with empty="skip", an
        # image-less sample left out of them would pull the mean image mass towards 0.
        valid = valid & terms.included.to(valid.device)
        if bool(valid.any()):
            vas_b = torch.stack([per_layer[i][1] for i in range(len(per_layer))]).mean(0)  # [B]
            img_b = torch.stack([per_layer[i][2] for i in range(len(per_layer))]).mean(0)  # [B]
            score, image = vas_b[valid].mean(), img_b[valid].mean()
        else:
            score = image = torch.tensor(float("nan"), dtype=torch.float64)
        values = torch.stack(
            [
                lm.detach().double().cpu(),
                enhance.detach().double().cpu(),
                suppress.detach().double().cpu(),
                score.double().cpu(),
                image.double().cpu(),
                terms.included.double().mean().cpu(),
            ]
        )
        if model.training:
            self._sums += values
            self._count += 1
        else:
            # Weighted by the batch's records, as Trainer weighs each batch's loss in eval_loss.
            n = masks["user_mask"].shape[0]
            self._eval_sums += values * n
            self._eval_count += n
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------------------------------- evaluation

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Trainer's loop over the held-out records, with the AGTO terms, VAS and image mass of every batch
        averaged into the metrics (eval_loss_lm, eval_vas, …), each batch weighted by its number of records
        as Trainer weighs eval_loss, so that eval_loss = eval_loss_lm + α·eval_loss_enhance_img + β·…"""
        self._eval_sums.zero_()
        self._eval_count = 0
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        totals = torch.cat([self._eval_sums, torch.tensor([float(self._eval_count)], dtype=torch.float64)])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum").cpu()
        if totals[-1] > 0:
            for key, value in zip(LOG_KEYS, (totals[:-1] / totals[-1]).tolist()):
                output.metrics[f"{metric_key_prefix}_{key}"] = value
        return output

    # ------------------------------------------------------------------------------------------- checkpoints

    def _get_output_dir(self, trial):
        staging = getattr(self, "_staging", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint, written into a staging folder and renamed to output_dir/checkpoint-<step> once
        whole (with its completion marker), so that a save cut short never looks like a checkpoint."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = self.args.output_dir
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging = staging_folder(run_dir, name)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            finish_checkpoint(
                os.path.join(staging_folder(run_dir, name), name),
                os.path.join(run_dir, name),
                {"step": self.state.global_step},
            )
            os.rmdir(staging_folder(run_dir, name))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()

    # ---------------------------------------------------------------------------------------------- resuming

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Load a checkpoint's weights strictly, through `from_pretrained`.

        `save_pretrained` writes Qwen2.5-VL weights under the checkpoint key names (`visual.*`, `model.layers.*`),
        which `Trainer`'s own loader hands to `load_state_dict(strict=False)` unconverted: every key would be
        missing and the run would resume from the initial weights with only a warning. DeepSpeed restores its
        own model states and keeps Trainer's path.
        """
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        dtype = next(target.parameters()).dtype
        saved = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype, local_files_only=True)
        target.load_state_dict(saved.state_dict(), strict=True)
        del saved

    # ------------------------------------------------------------------------------------------------ logging

    def log(self, logs, start_time=None):
        if "loss" in logs and self._count:
            totals = torch.cat([self._sums, torch.tensor([float(self._count)], dtype=torch.float64)])
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum").cpu()
            for key, value in zip(LOG_KEYS, (totals[:-1] / totals[-1]).tolist()):
                logs[key] = value
            self._sums.zero_()
            self._count = 0
        super().log(logs, start_time)
        if self.log_file and self.is_world_process_zero():
            os.makedirs(os.path.dirname(os.path.abspath(self.log_file)), exist_ok=True)
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.state.global_step, **logs}) + "\n")


# ---------------------------------------------------------------------------------------------------- the run


class RecordDataset(torch.utils.data.Dataset):
    def __init__(self, records):
        self.records = list(records)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


def load_model_and_processor(name_or_path: str, bf16: bool, seed: int):
    """The model and processor to train: "tiny" / "tiny:FAMILY" (tiny random models) or a local checkpoint of a
    supported family."""
    from avar_ops.analysis import load_model_and_processor as load

    return load(name_or_path, dtype=torch.bfloat16 if bf16 else torch.float32, seed=seed)


def training_arguments(cfg):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=cfg.output_dir,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        num_train_epochs=cfg.num_train_epochs,
        # The recipe's max_steps <= 0 means "by epochs"; Trainer reads only -1 so (0 would stop after one step).
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        bf16=cfg.bf16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        deepspeed=cfg.deepspeed,
        use_cpu=cfg.use_cpu,
        ddp_backend=cfg.ddp_backend,
        seed=cfg.seed,
        data_seed=cfg.data_seed,
        dataloader_num_workers=cfg.dataloader_num_workers,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if cfg.eval_file and cfg.eval_steps > 0 else "no",
        eval_steps=cfg.eval_steps if cfg.eval_steps > 0 else None,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        prediction_loss_only=True,  # the logits of every held-out batch are not kept (the metrics need none)
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        save_total_limit=cfg.save_total_limit,
        report_to=cfg.report_to or "none",
        remove_unused_columns=False,
        disable_tqdm=False,
    )


class _StopOnInterrupt(TrainerCallback):
    """Ends the run after the step in progress, with a checkpoint of it, once Ctrl-C asked for it."""

    def __init__(self, trainer: Trainer, request: StopRequest):
        self.trainer = trainer
        self.request = request
        self.stopped_at: Optional[int] = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.request.agreed(self.trainer.accelerator):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def _close_progress_bars(trainer: Trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None and hasattr(bar, "close"):
                bar.close()


def _checkpoint_step(path: str) -> int:
    """The global step a Trainer checkpoint was saved at."""
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):  # a checkpoint saved without the trainer state
        tail = os.path.basename(os.path.normpath(path)).rpartition("-")[2]
        return int(tail) if tail.isdigit() else 0


def _write_run_info(trainer: AGTOTrainer, output_dir: str) -> None:
    """run_info.json: how the run was distributed (what accelerate and DeepSpeed actually set up)."""
    state = trainer.accelerator.state
    plugin = getattr(state, "deepspeed_plugin", None)
    info = {
        "distributed_type": str(state.distributed_type).split(".")[-1],
        "num_processes": state.num_processes,
        "zero_stage": None if plugin is None else plugin.zero_stage,
        "backend": getattr(state, "backend", None),
    }
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, "run_info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)


def train_sft(cfg, records=None) -> AGTOTrainer:
    """Run SFT with AGTO as `cfg` (an `avar_train.sft.config.SFTConfig`) says; returns the finished trainer.
    records: the records to train on, already checked (`avar_train.preflight`); default: read cfg.train_file."""
    from avar_ops.data import load_records
    from avar_ops.hf import apply, family_of

    from ..data.collator import QwenVLCollator

    resume = cfg.resume_from_checkpoint
    if resume == "latest" or (resume is None and cfg.resume):
        found = latest_checkpoint(cfg.output_dir)
        if found is None and resume == "latest":
            raise ConfigError(f"resume_from_checkpoint: 'latest' but {cfg.output_dir} holds no whole checkpoint")
        resume = found
    elif resume is not None and not os.path.isdir(resume):
        raise ConfigError(f"resume_from_checkpoint: no such checkpoint folder {resume!r}")
    if resume and cfg.max_steps > 0 and _checkpoint_step(resume) >= cfg.max_steps:
        # Trainer would run one step past max_steps from such a checkpoint (and log it).
        raise ConfigError(
            f"resume: the run in {cfg.output_dir} is finished (its checkpoint {os.path.basename(resume)} reached "
            f"max_steps={cfg.max_steps}); nothing to resume: pass overwrite=true or use a new folder to train again"
        )
    args = training_arguments(cfg)  # before the model: it sets up the distributed state DeepSpeed needs
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size != launched:
        raise LaunchError(
            f"launched as {launched} processes but the run would train {args.world_size}-way (each process on its "
            "own); on CPU set use_cpu=true (and ddp_backend=gloo) for data parallelism"
        )
    if records is None:
        records = load_records(
            cfg.train_file,
            use="sft",
            on_error="skip" if cfg.skip_bad_records else "raise",
            rejects_path=os.path.join(cfg.output_dir, "rejects.jsonl"),
            format=cfg.data_format,
        ).records
    eval_records = None
    if cfg.eval_file:
        eval_records = load_records(
            cfg.eval_file,
            use="sft",
            on_error="skip" if cfg.skip_bad_records else "raise",
            rejects_path=os.path.join(cfg.output_dir, "eval_rejects.jsonl"),
            format=cfg.data_format,
        ).records
    model, processor = load_model_and_processor(cfg.model_name_or_path, cfg.bf16, cfg.seed)
    if cfg.freeze_vision_tower:
        family = family_of(model)
        for module in family.vision_modules(family.base_model(model)):
            module.requires_grad_(False)
    apply(model, processor)
    model.train()
    collator = QwenVLCollator(processor, max_length=cfg.max_length, mode="sft", **cfg.pixels(processor))
    trainer = AGTOTrainer(
        model=model,
        args=args,
        train_dataset=RecordDataset(records),
        eval_dataset=None if eval_records is None else RecordDataset(eval_records),
        data_collator=collator,
        processing_class=processor,
        agto=AGTOSettings(
            alpha=cfg.alpha, beta=cfg.beta, eps=cfg.agto_eps, layers=cfg.agto_layers, empty=cfg.agto_empty
        ),
        log_file=os.path.join(cfg.output_dir, "log.jsonl"),
    )
    if trainer.is_world_process_zero():
        # One run per log: the steps after the one this run starts from belong to a run that is replaced.
        truncate_log(trainer.log_file, _checkpoint_step(resume) if resume else 0)
    _write_run_info(trainer, cfg.output_dir)
    request = StopRequest("avar-train sft")
    stop = _StopOnInterrupt(trainer, request)
    trainer.add_callback(stop)
    with request:
        try:
            trainer.train(resume_from_checkpoint=resume)
        except BaseException:
            _close_progress_bars(trainer)  # so that the one-line error starts on a line of its own
            raise
    if stop.stopped_at is not None:
        raise Interrupted(stop.stopped_at)
    if eval_records is not None and not (cfg.eval_steps and trainer.state.global_step % cfg.eval_steps == 0):
        trainer.evaluate()  # the final model, unless the last step was just evaluated
    # The final model and processor in output_dir itself, whatever save_steps is: from_pretrained(output_dir).
    trainer.save_model(cfg.output_dir)
    trainer.save_state()
    return trainer
