"""GRPO with the visual-anchored reward (VARS) on accelerate (plain, DDP or DeepSpeed ZeRO-2/3).

One step, on every process:

1. rollouts: the step's prompts (each process its own slice, whole groups), each repeated `num_generations`
   times, sampled with HF `generate` under the avar patch (under ZeRO-3 inside a parameter gather);
2. text rewards (r_acc, r_format, the user's reward functions) from the decoded completions;
3. scoring: one forward over prompt + completion with `collect_masses(reduce=VisualStats)`, which gives the
   completion tokens' log-probs and, per rollout, r_visual (by default Eq. 5: the mean over its response tokens
   and the chosen layers of the head-averaged image / (system + ε) mass ratio; `visual_reward` picks an
   alternative) and the prompt's VAS. With `num_iterations = 1` this
   is the forward the loss back-propagates through (the masses are detached for the reward, so no extra forward
   is spent on it); with `num_iterations > 1` it runs without grad and gives the old log-probs;
4. r_total = r_acc + λ_v·gate(r_visual) + λ_f·r_format (+ weighted extras), group-normalised advantages, the
   clipped loss, `num_iterations` optimizer updates.

Token groups for the attention come from the prompt (`token_groups`) and are set explicitly on the patch for
generation and scoring, so completion tokens are always group 0 whatever the policy writes (a sampled
`<|im_start|>system` does not turn the rest of a rollout into system keys).

Determinism: the data order is a permutation per epoch drawn from `seed`; sampling uses the global torch RNG,
whose state accelerate saves in each checkpoint, so a resumed run draws the same rollouts as an uninterrupted
one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from avar_ops.core import select_indices
from avar_ops.data import Record, finish_checkpoint, latest_checkpoint, load_records, staging_folder, truncate_log
from avar_ops.hf import apply, attention_layer_indices, collect_masses, family_of, get_handle, token_groups

from ..data.collator import QwenVLCollator
from ..interrupt import Interrupted, StopRequest
from .config import GRPOConfig
from .loss import group_advantages, policy_loss
from .rewards import (
    DEFAULT_FORMAT_PATTERN,
    AccuracyReward,
    VisualStats,
    accuracy_reward,
    call_reward_function,
    combine_rewards,
    format_reward,
    load_reward_function,
    visual_terms,
)

__all__ = ["GRPOTrainer", "Rollouts", "completion_mask", "completion_logps", "train_grpo"]

LOG_FILE = "log.jsonl"
STATE_FILE = "grpo_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


# ------------------------------------------------------------------------------------------- token helpers


def completion_mask(completion_ids: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """bool [B, C]: each completion's tokens up to and including its first end-of-sequence token."""
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)  # [B, C]
    for e in eos_ids:
        is_eos |= completion_ids == e
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # [B, C] eos tokens strictly before
    return before == 0


def completion_logps(logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 [B, C]: log p(completion token) from logits [B, C, V] (logits[:, t] predicts token t), one row at a
    time so that only one [C, V] float32 copy exists."""
    rows = []
    for b in range(logits.shape[0]):
        row = logits[b].float() / temperature  # [C, V]
        picked = row.gather(-1, completion_ids[b][:, None]).squeeze(-1)  # [C]
        rows.append(picked - torch.logsumexp(row, dim=-1))  # [C]
    return torch.stack(rows)  # [B, C]


@dataclass
class Rollouts:
    """One step's rollouts on this process (N = prompts × num_generations rows)."""

    inputs: Dict[str, torch.Tensor]  # the model inputs for prompt + completion (ids [N, P + C], pixel values …)
    prompt_len: int  # P (prompts are left-padded to it)
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # bool [N, C]
    key_group: torch.Tensor  # int8 [N, P]: the prompt's groups, set on the patch for generation and scoring
    user_mask: torch.Tensor  # bool [N, P + C]: the user-turn tokens (prompt VAS)
    response_mask: torch.Tensor  # bool [N, P + C]: completion tokens (r_visual's queries)
    prompts: List[str]
    completions: List[str]
    columns: Dict[str, list]  # dataset columns, one value per rollout


# ------------------------------------------------------------------------------------------------ trainer


def _kept_ids(ro: Rollouts) -> list:
    """Each completion's token ids up to and including its first EOS (what the reward functions see)."""
    return [row[m].tolist() for row, m in zip(ro.completion_ids, ro.completion_mask)]


class GRPOTrainer:
    """The GRPO loop on an `accelerate.Accelerator`; see the module docstring.

    model / processor: a Qwen2.5-VL and its processor (built from cfg.model_name_or_path when not given).
    reward_funcs: extra TRL-style reward functions added to r_total with `reward_weights` (besides those named
    in cfg.reward_funcs). accuracy: replaces the built-in r_acc (a TRL-style function; a rollout counts as
    correct, for gating r_visual, when it scores >= 1).
    """

    def __init__(
        self,
        cfg: GRPOConfig,
        model=None,
        processor=None,
        *,
        accelerator=None,
        reward_funcs: Optional[Dict[str, Callable]] = None,
        reward_weights: Optional[Dict[str, float]] = None,
        accuracy: Optional[Callable] = None,
        records: Optional[List[Record]] = None,
    ):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        if model is None and str(cfg.model_name_or_path).startswith("tiny"):
            # Built before the accelerator: under ZeRO-3 with zero3_init_flag, a model constructed later is
            # initialised inside deepspeed.zero.Init, which draws other random weights than a plain run.
            model, processor = _load_model(cfg)
        self.accelerator = accelerator or Accelerator(log_with=cfg.report_to or None, project_dir=cfg.output_dir)
        acc = self.accelerator
        set_seed(cfg.seed)
        os.makedirs(cfg.output_dir, exist_ok=True)
        if records is None:
            records = load_records(
                cfg.train_file,
                use="rl",
                on_error="skip" if cfg.skip_bad_records else "raise",
                rejects_path=os.path.join(cfg.output_dir, "rejects.jsonl"),
                format=cfg.data_format,
            ).records
        self.records: List[Record] = list(records)
        self.eval_records: List[Record] = []
        self.eval_history: List[dict] = []  # the evaluate() logs of this run
        if cfg.eval_file is not None:
            self.eval_records = load_records(
                cfg.eval_file,
                use="rl",
                on_error="skip" if cfg.skip_bad_records else "raise",
                rejects_path=os.path.join(cfg.output_dir, "eval_rejects.jsonl"),
                format=cfg.data_format,
            ).records
        prompts_per_step = acc.num_processes * cfg.per_device_train_batch_size // cfg.num_generations
        if prompts_per_step > len(self.records):
            raise ValueError(f"a step takes {prompts_per_step} prompts but the data holds {len(self.records)} records")
        if model is None:
            model, processor = _load_model(cfg)
        elif processor is None:
            raise ValueError("GRPOTrainer: a model given without its processor")
        self.processor = processor
        self.collator = QwenVLCollator(
            processor,
            mode="prompt",
            max_length=cfg.max_prompt_length or _NO_PROMPT_LIMIT,
            min_pixels=cfg.min_pixels,  # None: the processor's own sizes
            max_pixels=cfg.max_pixels,
        )
        tok = processor.tokenizer
        self.eos_ids = sorted({int(i) for i in _as_list(model.generation_config.eos_token_id)})
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]
        t = self.collator.template
        self.vision_ids = list(t.vision_ids)
        n_layers = len(attention_layer_indices(model.config))  # softmax-attention layers
        # −n ≤ i < n, negative from the end (the rule of every layer selection in avar).
        self.visual_layers = select_indices(cfg.visual_layers, n_layers, "visual_layers")
        self.ref_model = None
        if cfg.beta > 0:
            # A frozen copy taken before the patch (the reference needs no masses) and before any update.
            self.ref_model = _frozen_copy(model).to(acc.device)
        if get_handle(model) is None:
            apply(model, processor)
        if cfg.freeze_vision_tower:
            family = family_of(model)
            for module in family.vision_modules(family.base_model(model)):
                module.requires_grad_(False)
        if cfg.gradient_checkpointing:
            # Non-reentrant: the patch keeps the first forward's masses and the recomputation matches it.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        model.train()

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
        )
        scheduler = _scheduler(optimizer, cfg)
        ds = acc.state.deepspeed_plugin
        self.zero_stage = 0
        if ds is not None:
            text_config = getattr(model.config, "text_config", None) or model.config
            _fill_deepspeed_auto(ds.deepspeed_config, cfg, text_config.hidden_size)
            self.zero_stage = int(ds.zero_stage or 0)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)

        self.accuracy = accuracy or accuracy_reward(_load_checker(cfg.accuracy_checker))
        self.format = format_reward(cfg.format_pattern or DEFAULT_FORMAT_PATTERN)
        self.extras: Dict[str, Callable] = {}
        self.extra_weights: Dict[str, float] = {}
        for i, spec in enumerate(cfg.reward_funcs):
            self.extras[spec] = load_reward_function(spec)
            self.extra_weights[spec] = 1.0 if cfg.reward_weights is None else float(cfg.reward_weights[i])
        for name, fn in (reward_funcs or {}).items():
            self.extras[name] = fn
            self.extra_weights[name] = float((reward_weights or {}).get(name, 1.0))

        self.step = 0
        self._log_path = os.path.join(cfg.output_dir, LOG_FILE)
        if cfg.report_to:
            acc.init_trackers("avar-grpo", config={k: v for k, v in vars(cfg).items() if _is_plain(v)})
        where = cfg.resume_from_checkpoint or ("latest-or-none" if cfg.resume else None)
        if where is not None:
            self._resume(where)
        if acc.is_main_process:
            # One run per log: steps after the one this run starts from belong to a run that is replaced.
            truncate_log(self._log_path, self.step)
        if where is None or self.step == 0:
            # Seed again once the backend is set up (DeepSpeed's initialisation draws from the RNG), so that
            # plain, DDP and ZeRO runs sample the same rollouts.
            set_seed(cfg.seed)

    # ---------------------------------------------------------------------------------------- data order

    def _step_records(self, step: int) -> List[Record]:
        """This process's prompts of `step`: a per-epoch permutation from the seed, sliced by process."""
        acc, cfg = self.accelerator, self.cfg
        per_proc = cfg.per_device_train_batch_size // cfg.num_generations
        per_step = per_proc * acc.num_processes
        steps_per_epoch = len(self.records) // per_step
        epoch, within = divmod(step, steps_per_epoch)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.records), generator=g).tolist()
        start = within * per_step + acc.process_index * per_proc
        return [self.records[i] for i in order[start : start + per_proc]]

    # ------------------------------------------------------------------------------------------ rollouts

    @contextlib.contextmanager
    def _generation_model(self):
        """The unwrapped policy, with ZeRO-3 parameters gathered for the duration of `generate`."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                yield unwrapped
        else:
            yield unwrapped

    @torch.no_grad()
    def generate(self, records: List[Record], *, greedy: bool = False) -> Rollouts:
        """`num_generations` sampled rollouts per record; greedy: one greedy completion per record (for the
        held-out evaluation; it draws nothing from the RNG, so evaluating does not change the training run)."""
        cfg = self.cfg
        expanded = list(records) if greedy else [r for r in records for _ in range(cfg.num_generations)]
        prompt = self.prompt_inputs(expanded)
        prompt_ids, prompt_att = prompt["input_ids"], prompt["attention_mask"]  # [N, P] each
        P = prompt_ids.shape[1]
        groups = token_groups(prompt_ids, self.processor, prompt_att)
        # top_k 0 switches top-k off (a checkpoint's generation config may set 50). Vision placeholders are never
        # sampled: an image token in a completion has no image features behind it and breaks the scoring forward.
        sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or 0)
        kwargs = dict(
            **(dict(do_sample=False, temperature=None, top_p=None, top_k=None) if greedy else sampling),
            max_new_tokens=cfg.max_completion_length,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            suppress_tokens=self.vision_ids,
        )
        with self._generation_model() as policy:
            handle = get_handle(policy)
            handle.set_key_groups(groups.key_group)
            was_training = policy.training
            policy.eval()
            try:
                out = policy.generate(**prompt, **kwargs, use_cache=True)  # [N, P + C]
            finally:
                handle.set_key_groups(None)
                policy.train(was_training)
        return self.assemble(expanded, prompt, out[:, P:])

    def prompt_inputs(self, records: List[Record]) -> Dict[str, torch.Tensor]:
        """Left-padded prompt inputs (conversation without a final assistant turn, plus the generation header)."""
        cut = self.collator.truncated
        batch = self.collator(records)
        if self.collator.truncated != cut:
            raise ValueError(
                f"records {[r.id for r in records]}: a prompt is longer than max_prompt_length="
                f"{self.cfg.max_prompt_length}; a prompt is never cut (that would drop the question)"
            )
        dev = self.accelerator.device
        return {k: v.to(dev) for k, v in QwenVLCollator.model_inputs(batch).items()}

    def assemble(
        self, expanded: List[Record], prompt: Dict[str, torch.Tensor], completion_ids: torch.Tensor
    ) -> Rollouts:
        """Rollouts from the prompts' inputs (left-padded) and sampled completion ids [N, C]: everything after a
        completion's first end-of-sequence token becomes padding."""
        dev = self.accelerator.device
        prompt_ids, prompt_att = prompt["input_ids"], prompt["attention_mask"]  # [N, P] each
        P = prompt_ids.shape[1]
        if completion_ids.shape[1] == 0:
            raise RuntimeError("generate returned no new token")
        groups = token_groups(prompt_ids, self.processor, prompt_att)
        cmask = completion_mask(completion_ids, self.eos_ids)  # [N, C]
        completion_ids = completion_ids.masked_fill(~cmask, self.pad_id)
        N, C = completion_ids.shape
        inputs = dict(prompt)
        for key in ("mm_token_type_ids", "token_type_ids"):  # per-token types: completion tokens are text (0)
            if key in inputs:
                inputs[key] = torch.nn.functional.pad(inputs[key], (0, C), value=0)  # [N, P + C]
        inputs["input_ids"] = torch.cat([prompt_ids, completion_ids], dim=1)  # [N, P + C]
        inputs["attention_mask"] = torch.cat([prompt_att, cmask.to(prompt_att.dtype)], dim=1)  # [N, P + C]
        zeros_c = torch.zeros(N, C, dtype=torch.bool, device=dev)
        zeros_p = torch.zeros(N, P, dtype=torch.bool, device=dev)
        tok = self.processor.tokenizer
        prompts_text = tok.batch_decode(prompt_ids.masked_fill(prompt_att == 0, self.pad_id), skip_special_tokens=False)
        completions = tok.batch_decode(completion_ids, skip_special_tokens=True)
        columns = {
            "answer": [r.answer for r in expanded],
            "id": [r.id for r in expanded],
            "question": [r.question for r in expanded],
            "meta": [r.meta for r in expanded],
        }
        return Rollouts(
            inputs=inputs,
            prompt_len=P,
            completion_ids=completion_ids,
            completion_mask=cmask,
            key_group=groups.key_group,
            user_mask=torch.cat([groups.user_mask, zeros_c], dim=1),
            response_mask=torch.cat([zeros_p, cmask], dim=1),
            prompts=prompts_text,
            completions=completions,
            columns=columns,
        )

    # --------------------------------------------------------------------------------------------- scoring

    def _forward_logps(self, model, ro: Rollouts, stats: Optional[VisualStats]):
        """Completion log-probs [N, C] of one forward over prompt + completion; with `stats`, also the per-layer
        VisualStats sums from the same forward."""
        C = ro.completion_ids.shape[1]
        target = self.accelerator.unwrap_model(model)
        handle = get_handle(target)
        handle.set_key_groups(ro.key_group)
        try:
            with collect_masses(target, reduce=stats) if stats is not None else contextlib.nullcontext() as rec:
                out = model(**ro.inputs, use_cache=False, logits_to_keep=C + 1)
            per_layer = rec.masses if stats is not None else None
        finally:
            handle.set_key_groups(None)
        logits = out.logits[:, :-1]  # [N, C, V]: position P - 1 + t predicts completion token t
        return completion_logps(logits, ro.completion_ids, self.cfg.temperature), per_layer

    @torch.no_grad()
    def _ref_logps(self, ro: Rollouts) -> torch.Tensor:
        C = ro.completion_ids.shape[1]
        out = self.ref_model(**ro.inputs, use_cache=False, logits_to_keep=C + 1)
        return completion_logps(out.logits[:, :-1], ro.completion_ids, self.cfg.temperature)  # [N, C]

    def _visual_terms(self, ro: Rollouts, per_layer):
        """r_visual and the prompt / response attention statistics of `ro`, of the kind, cap and layers configured."""
        cfg = self.cfg
        return visual_terms(
            per_layer,
            ro.response_mask,
            ro.user_mask,
            self.visual_layers,
            eps=cfg.visual_eps,
            kind=cfg.visual_reward,
            cap=cfg.visual_reward_cap,
        )

    def _rewards(self, ro: Rollouts, per_layer) -> tuple:
        cfg = self.cfg
        terms = self._visual_terms(ro, per_layer)
        ids = _kept_ids(ro)
        acc = call_reward_function("accuracy", self.accuracy, ro.prompts, ro.completions, ids, ro.columns)
        fmt = call_reward_function("format", self.format, ro.prompts, ro.completions, ids, ro.columns)
        extras = {
            name: call_reward_function(name, fn, ro.prompts, ro.completions, ids, ro.columns)
            for name, fn in self.extras.items()
        }
        breakdown = combine_rewards(
            acc,
            fmt,
            terms.ratio,
            lambda_visual=cfg.lambda_visual,
            lambda_format=cfg.lambda_format,
            visual_reward_max=cfg.visual_reward_max,
            extras=extras,
            extra_weights=self.extra_weights,
        )
        return breakdown, terms

    # ---------------------------------------------------------------------------------------------- a step

    def train_step(self) -> dict:
        """Rollouts, rewards, advantages and `num_iterations` updates for step `self.step`; returns its log."""
        cfg, acc = self.cfg, self.accelerator
        t0 = time.perf_counter()
        ro = self.generate(self._step_records(self.step))
        t_gen = time.perf_counter() - t0
        n_tokens_local = ro.completion_mask.sum()
        n_tokens = int(acc.gather(n_tokens_local[None]).sum())
        n_seq = ro.completion_ids.shape[0]
        stats = VisualStats(ro.response_mask, ro.user_mask, eps=cfg.visual_eps)
        ref = self._ref_logps(ro) if self.ref_model is not None else None
        loss_kwargs = dict(
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            loss_type=cfg.loss_type,
            beta=cfg.beta,
            ref_logps=ref,
            max_completion_length=cfg.max_completion_length,
            num_sequences=n_seq,
            num_tokens=n_tokens / acc.num_processes,
        )

        t1 = time.perf_counter()
        updates = []
        if cfg.num_iterations == 1:
            # The scoring forward is the loss's forward: rewards from its detached masses.
            logps, per_layer = self._forward_logps(self.model, ro, stats)
            breakdown, terms = self._rewards(ro, per_layer)
            adv = self._advantages(breakdown.total).to(logps.device)
            t_score = time.perf_counter() - t1
            t2 = time.perf_counter()
            updates.append(self._update(logps, logps.detach(), adv, ro, loss_kwargs))
        else:
            with torch.no_grad():
                old, per_layer = self._forward_logps(self.model, ro, stats)
            breakdown, terms = self._rewards(ro, per_layer)
            adv = self._advantages(breakdown.total).to(old.device)
            t_score = time.perf_counter() - t1
            t2 = time.perf_counter()
            for _ in range(cfg.num_iterations):
                logps, _ = self._forward_logps(self.model, ro, None)
                updates.append(self._update(logps, old, adv, ro, loss_kwargs))
        t_update = time.perf_counter() - t2
        self.step += 1
        return self._log(ro, breakdown, terms, updates, {"generation": t_gen, "scoring": t_score, "update": t_update})

    def _advantages(self, total: torch.Tensor) -> torch.Tensor:
        """Group advantages of this process's rewards [N]; "batch" scaling divides by the std of every process's."""
        acc = self.accelerator

        def gather(t: torch.Tensor) -> torch.Tensor:
            return acc.gather(t.to(acc.device)).cpu()

        return group_advantages(total, self.cfg.num_generations, self.cfg.scale_rewards, gather=gather)

    def _update(self, logps, old, adv, ro: Rollouts, loss_kwargs) -> dict:
        acc = self.accelerator
        res = policy_loss(logps, old, adv.to(logps.dtype), ro.completion_mask, **loss_kwargs)
        acc.backward(res.loss)
        grad_norm = None
        if acc.sync_gradients and self.zero_stage == 0 and self.cfg.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        if grad_norm is None and self.zero_stage:
            grad_norm = self.model.get_global_grad_norm() if hasattr(self.model, "get_global_grad_norm") else None
        return {
            "loss": res.loss.detach(),
            "clip_low": res.clip_low,
            "clip_high": res.clip_high,
            "kl": res.kl,
            "grad_norm": None if grad_norm is None else float(grad_norm),
        }

    # ----------------------------------------------------------------------------------------------- logs

    def _log(self, ro: Rollouts, br, terms, updates: List[dict], times: Dict[str, float]) -> dict:
        acc = self.accelerator
        dev = acc.device

        def mean(x: torch.Tensor) -> float:  # mean over every rollout of every process
            return float(acc.gather(x.to(dev, torch.float64).reshape(-1)).mean())

        lengths = ro.completion_mask.sum(-1).to(torch.float64)  # [N]
        all_lengths = acc.gather(lengths.to(dev))
        statuses = getattr(self.accuracy, "last_statuses", None) if isinstance(self.accuracy, AccuracyReward) else None
        record = {
            "step": self.step,
            # Each process's loss is its share normalised so that the data-parallel mean is the batch loss.
            "loss": mean(torch.stack([u["loss"].double() for u in updates]).mean()[None]),
            "reward": mean(br.total),
            "reward_std": float(acc.gather(br.total.to(dev)).std())
            if br.total.numel() * acc.num_processes > 1
            else 0.0,
            "r_acc": mean(br.accuracy),
            "r_format": mean(br.format),
            "r_visual_raw": mean(br.visual_raw),
            "r_visual": mean(br.visual),
            "accuracy": mean(br.correct.double()),
            "response_image_mass": mean(terms.response_image_mass),
            "response_system_mass": mean(terms.response_system_mass),
            "prompt_vas": mean(terms.prompt_vas),
            "completion_length": float(all_lengths.mean()),
            "completion_length_min": float(all_lengths.min()),
            "completion_length_max": float(all_lengths.max()),
            "clip_low": mean(torch.stack([u["clip_low"].double() for u in updates]).mean()[None]),
            "clip_high": mean(torch.stack([u["clip_high"].double() for u in updates]).mean()[None]),
            "lr": float(self.scheduler.get_last_lr()[0]),
            "time_generation": times["generation"],
            "time_scoring": times["scoring"],
            "time_update": times["update"],
        }
        record.update(self._token_ratio_quantiles(terms.token_ratios))
        for name, values in br.extras.items():
            record[f"reward/{name}"] = mean(values)
        if updates[-1]["kl"] is not None:
            record["kl"] = mean(torch.stack([u["kl"].double() for u in updates]).mean()[None])
        if updates[-1]["grad_norm"] is not None:
            record["grad_norm"] = updates[-1]["grad_norm"]
        if statuses is not None:
            counts = torch.tensor([statuses.count("timeout"), statuses.count("error")], dtype=torch.float64)
            tot = acc.gather(counts.to(dev)[None]).sum(0)
            record["checker_timeouts"], record["checker_errors"] = int(tot[0]), int(tot[1])
        if acc.is_main_process and (self.step % self.cfg.logging_steps == 0 or self.step == self.cfg.max_steps):
            with open(self._log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.cfg.report_to:
                acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy completions of the held-out records (eval_file): accuracy (the run's r_acc counting a rollout
        correct at >= 1), the prompts' VAS and the response tokens' image mass and r_visual (ungated), each the
        mean over the records; written to log.jsonl with the keys prefixed eval_. Every process runs the same
        number of batches (ZeRO-3 gathers parameters collectively); padding rows do not count."""
        acc, cfg = self.accelerator, self.cfg
        if not self.eval_records:
            raise ValueError("evaluate: the run has no eval_file")
        mine = self.eval_records[acc.process_index :: acc.num_processes]
        per_batch = max(1, cfg.per_device_train_batch_size // cfg.num_generations)
        n_batches = -(-math.ceil(len(self.eval_records) / acc.num_processes) // per_batch)
        sums = torch.zeros(5, dtype=torch.float64)  # correct, prompt VAS, image mass, r_visual, count
        for b in range(n_batches):
            chunk = mine[b * per_batch : (b + 1) * per_batch]
            weight = torch.ones(per_batch, dtype=torch.float64)
            weight[len(chunk) :] = 0.0
            chunk = chunk + [self.eval_records[0]] * (per_batch - len(chunk))
            ro = self.generate(chunk, greedy=True)
            stats = VisualStats(ro.response_mask, ro.user_mask, eps=cfg.visual_eps)
            _, per_layer = self._forward_logps(self.model, ro, stats)
            terms = self._visual_terms(ro, per_layer)
            ids = _kept_ids(ro)
            r_acc = call_reward_function("accuracy", self.accuracy, ro.prompts, ro.completions, ids, ro.columns)
            values = torch.stack(
                [(r_acc >= 1.0).double(), terms.prompt_vas, terms.response_image_mass, terms.ratio, weight]
            )  # [5, per_batch]
            sums += (values * weight).sum(-1)
        if acc.num_processes > 1:
            sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
        n = float(sums[4])
        record = {
            "step": self.step,
            "eval_accuracy": float(sums[0]) / n,
            "eval_prompt_vas": float(sums[1]) / n,
            "eval_response_image_mass": float(sums[2]) / n,
            "eval_r_visual_raw": float(sums[3]) / n,
            "eval_samples": int(n),
        }
        if acc.is_main_process:
            with open(self._log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if cfg.report_to:
                acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        return record

    def _token_ratio_quantiles(self, ratios: torch.Tensor) -> Dict[str, float]:
        """p50 / p90 / max of the per-token Eq. 5 terms of every response token of every process."""
        acc = self.accelerator
        local = ratios.to(acc.device, torch.float64).reshape(-1)  # [T]
        if acc.num_processes > 1:
            local = acc.gather(acc.pad_across_processes(local, pad_index=float("nan")))  # [P·T_max]
        if not bool(torch.isfinite(local).any()):
            return {}
        q = torch.nanquantile(local.cpu(), torch.tensor([0.5, 0.9], dtype=torch.float64))
        top = float(local[torch.isfinite(local)].max())
        return {"r_visual_token_p50": float(q[0]), "r_visual_token_p90": float(q[1]), "r_visual_token_max": top}

    # ------------------------------------------------------------------------------------- checkpointing

    def save_checkpoint(self) -> str:
        """Model, optimizer, scheduler and RNG states (accelerate) plus the step, in output_dir/checkpoint-<step>:
        written into a staging folder and renamed into place once whole, with its completion marker."""
        name = f"{CHECKPOINT_PREFIX}{self.step}"
        path = os.path.join(self.cfg.output_dir, name)
        staging = staging_folder(self.cfg.output_dir, name)
        self.accelerator.save_state(staging)
        if self.accelerator.is_main_process:
            with open(os.path.join(staging, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump({"step": self.step, "seed": self.cfg.seed, "num_records": len(self.records)}, f)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            finish_checkpoint(staging, path, {"step": self.step})
        self.accelerator.wait_for_everyone()
        return path

    def _resume(self, where: str) -> None:
        path = latest_checkpoint(self.cfg.output_dir) if where in ("latest", "latest-or-none") else where
        if path is None and where == "latest-or-none":
            return  # resume=true on a run that saved no checkpoint yet: it starts again from step 0
        if path is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint=latest: no whole {CHECKPOINT_PREFIX}* in {self.cfg.output_dir}"
            )
        state_file = os.path.join(path, STATE_FILE)
        if not os.path.isfile(state_file):
            raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a GRPO checkpoint (no {STATE_FILE})")
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("num_records") != len(self.records) or state.get("seed") != self.cfg.seed:
            raise ValueError(
                f"resume_from_checkpoint: {path} was written for seed {state.get('seed')} and "
                f"{state.get('num_records')} records; this run has seed {self.cfg.seed} and {len(self.records)}"
            )
        self.accelerator.load_state(path)
        self.step = int(state["step"])

    def save_model(self, path: Optional[str] = None) -> str:
        """The policy as a Hugging Face checkpoint (weights gathered under ZeRO-3) with its processor, by default in
        output_dir itself (`from_pretrained(output_dir)` loads the trained model)."""
        acc = self.accelerator
        path = path or self.cfg.output_dir
        state_dict = acc.get_state_dict(self.model)
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(path, state_dict=state_dict)
            self.processor.save_pretrained(path)
        acc.wait_for_everyone()
        return path

    def train(self) -> List[dict]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        history = []
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="grpo", disable=not self.accelerator.is_main_process)
        with StopRequest("avar-train grpo") as request, bar:  # the bar closes on an error too
            while self.step < cfg.max_steps:
                record = self.train_step()
                history.append(record)
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward']:.3f}", acc=f"{record['accuracy']:.2f}")
                if request.agreed(self.accelerator) and self.step < cfg.max_steps:
                    self.save_checkpoint()
                    raise Interrupted(self.step)
                if (
                    self.eval_records
                    and cfg.eval_steps
                    and self.step % cfg.eval_steps == 0
                    and self.step < cfg.max_steps
                ):
                    self.eval_history.append(self.evaluate())
                if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint()
        if self.eval_records:
            self.eval_history.append(self.evaluate())
        self.save_checkpoint()
        if cfg.report_to:
            self.accelerator.end_training()
        return history


# ------------------------------------------------------------------------------------------------ helpers


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _is_plain(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


_NO_PROMPT_LIMIT = 1 << 30


def _fill_deepspeed_auto(ds_config: dict, cfg: GRPOConfig, hidden: int) -> None:
    """Give the DeepSpeed config's "auto" entries the values this loop runs with (there is no dataloader for
    accelerate to read the batch size from, and Qwen2.5-VL keeps hidden_size in its text config); the
    bucket sizes follow the sizes transformers' Trainer derives from the hidden size."""
    ds_config["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
    ds_config["gradient_accumulation_steps"] = 1
    ds_config["gradient_clipping"] = cfg.max_grad_norm
    ds_config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    zero = ds_config.get("zero_optimization", {})
    sizes = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value


def _load_checker(spec: Optional[str]):
    return None if spec is None else load_reward_function(spec)


def _scheduler(optimizer, cfg: GRPOConfig):
    total = cfg.max_steps * cfg.num_iterations
    warmup = int(math.ceil(cfg.warmup_ratio * total))

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / (warmup + 1)
        if cfg.lr_scheduler_type == "constant":
            return 1.0
        progress = (i - warmup) / max(1, total - warmup)
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _load_model(cfg: GRPOConfig):
    from avar_ops.analysis import load_model_and_processor

    kwargs = {k: getattr(cfg, k) for k in ("min_pixels", "max_pixels") if getattr(cfg, k) is not None}
    return load_model_and_processor(
        cfg.model_name_or_path,
        dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        seed=cfg.seed,
        processor_kwargs=kwargs,
    )


def _frozen_copy(model):
    import copy

    if get_handle(model) is not None:
        raise ValueError(
            "GRPOTrainer: with beta > 0 pass the model unpatched, so that a clean reference copy can be "
            "taken (the trainer patches the policy itself)"
        )
    return copy.deepcopy(model).eval().requires_grad_(False)


def train_grpo(cfg: GRPOConfig, **kwargs) -> List[dict]:
    """Build a `GRPOTrainer` from the recipe and run it to cfg.max_steps; returns the per-step logs."""
    trainer = GRPOTrainer(cfg, **kwargs)
    history = trainer.train()
    trainer.save_model()
    return history
