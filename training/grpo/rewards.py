"""VARS rewards: r_total = r_acc + λ_v·r_visual + λ_f·r_format (+ any reward functions the user adds).

Text rewards have TRL's signature, so that reward functions move between the two trainers:

    f(prompts, completions, completion_ids, **columns) -> list of floats, one per rollout

(`prompts` / `completions` are strings, `completion_ids` lists of token ids, `columns` the dataset's columns
repeated per rollout, e.g. `answer`). `accuracy_reward` and `format_reward` build the two built-in ones.

r_visual (the paper's Eq. 5) comes from the policy's attention, not from text. For every rollout, over its
response tokens t only (prompt and padding excluded) and the chosen layers l:

    r_visual = mean_t mean_l  m̄_img(l, t) / (m̄_sys(l, t) + ε)          m̄ = mass averaged over the heads of l

one number per sequence, then gated: 0 for a rollout whose answer is wrong, optionally capped at
`visual_reward_max` (the ratio can reach 10–20 and swamp r_acc; the paper has no cap). The recipe key
`visual_reward` swaps Eq. 5 for one of the alternatives of `avar_ops.method.visual_reward` (capped_ratio with
`visual_reward_cap` per term, ratio_of_sums, image_mass); the spread of the per-token Eq. 5 terms is logged
every step (r_visual_token_p50 / p90 / max). `VisualStats` is the
per-layer reduction handed to `collect_masses`, so a forward keeps the head-averaged response masses per
layer ([B, R]) and never the [B, H, L, 4] masses of all layers.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = [
    "DEFAULT_FORMAT_PATTERN",
    "CHECK_STATUSES",
    "RewardFn",
    "format_reward",
    "accuracy_reward",
    "AccuracyReward",
    "VisualStats",
    "VisualTerms",
    "visual_terms",
    "RewardBreakdown",
    "combine_rewards",
    "call_reward_function",
    "load_reward_function",
    "RewardError",
]

# <think>…</think><answer>…</answer>, nothing else around them but white space.
DEFAULT_FORMAT_PATTERN = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"
CHECK_STATUSES = ("correct", "incorrect", "timeout", "error")

RewardFn = Callable[..., List[float]]


class RewardError(ValueError):
    """A reward function that raised or returned something unusable; the message names the function."""


_VISUAL, _SYSTEM = 1, 2


# ------------------------------------------------------------------------------------------------ text rewards


def format_reward(pattern: str = DEFAULT_FORMAT_PATTERN) -> RewardFn:
    """r_format: 1.0 for a completion that matches `pattern` as a whole (re.DOTALL), else 0.0."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"format_reward: pattern must be a non-empty regular expression string, got {pattern!r}")
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise ValueError(f"format_reward: pattern {pattern!r} is not a valid regular expression ({exc})") from exc

    def r_format(prompts, completions, completion_ids, **columns) -> List[float]:
        return [1.0 if compiled.fullmatch(c) else 0.0 for c in completions]

    return r_format


Checker = Callable[[Sequence[str], Sequence[str]], Sequence[str]]


def _answers_checker() -> Checker:
    """The shared answer checker of `avar_ops.grading` (AnswerChecker): extraction from <answer>…</answer> or a
    final \\boxed{}, letters, numbers with tolerance, LaTeX through math-verify in a subprocess pool with a hard
    timeout; each result is correct / incorrect / timeout / error."""
    import avar_ops.grading as grading

    if not hasattr(grading, "AnswerChecker"):
        raise ImportError(
            "accuracy_reward: this avar_ops has no shared answer checker (avar_ops.grading.AnswerChecker); pass "
            "checker= (a function (completions, references) -> statuses) or accuracy_checker: module:function"
        )
    checker = grading.AnswerChecker()

    def check(completions: Sequence[str], references: Sequence[str]) -> List[str]:
        specs = [grading.AnswerSpec(str(r)) for r in references]
        return [r.status for r in grading.check_answers(list(completions), specs, checker)]

    return check


class AccuracyReward:
    """r_acc: 1.0 when the rollout's final answer matches the reference column, else 0.0.

    `checker(completions, references) -> statuses` (each one of CHECK_STATUSES); the default is the shared
    answer checker. A timeout or a checker error scores 0 and is counted in `counts` (cumulative) and in
    `last_statuses` (the last call), which the trainer logs: nothing is scored silently.
    """

    def __init__(self, checker: Optional[Checker] = None, answer_column: str = "answer"):
        if checker is not None and not callable(checker):
            raise TypeError(f"accuracy_reward: checker must be callable, got {type(checker).__name__}")
        self._checker = checker
        self.answer_column = answer_column
        self.counts: Dict[str, int] = {s: 0 for s in CHECK_STATUSES}
        self.last_statuses: List[str] = []
        self.__name__ = "r_acc"

    def __call__(self, prompts, completions, completion_ids, **columns) -> List[float]:
        if self.answer_column not in columns:
            raise KeyError(
                f"accuracy_reward: the data has no {self.answer_column!r} column (columns: {sorted(columns)})"
            )
        references = columns[self.answer_column]
        if len(references) != len(completions):
            raise ValueError(f"accuracy_reward: {len(completions)} completions but {len(references)} references")
        missing = [i for i, r in enumerate(references) if r is None]
        if missing:
            raise ValueError(f"accuracy_reward: rollouts {missing} have no reference answer")
        if self._checker is None:
            self._checker = _answers_checker()
        statuses = list(self._checker(list(completions), [str(r) for r in references]))
        if len(statuses) != len(completions):
            raise ValueError(f"accuracy_reward: the checker gave {len(statuses)} statuses for {len(completions)}")
        bad = sorted({s for s in statuses if s not in CHECK_STATUSES})
        if bad:
            raise ValueError(f"accuracy_reward: the checker returned statuses {bad}, expected {CHECK_STATUSES}")
        for s in statuses:
            self.counts[s] += 1
        self.last_statuses = statuses
        return [1.0 if s == "correct" else 0.0 for s in statuses]


def accuracy_reward(checker: Optional[Checker] = None, answer_column: str = "answer") -> AccuracyReward:
    """r_acc as a TRL-style reward function (see `AccuracyReward`)."""
    return AccuracyReward(checker, answer_column)


def load_reward_function(spec: str) -> RewardFn:
    """A reward function named "package.module:function" (imported; it must be callable)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"reward function must be given as 'package.module:function', got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward function {spec!r}: cannot import {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def call_reward_function(
    name: str,
    fn: RewardFn,
    prompts: List[str],
    completions: List[str],
    completion_ids: List[List[int]],
    columns: Dict[str, list],
) -> torch.Tensor:
    """Run one TRL-style reward function and check what it returns: float64 [N]. Whatever goes wrong is a
    `RewardError` naming the function."""
    try:
        values = fn(prompts, completions, completion_ids, **columns)
    except Exception as exc:  # noqa: BLE001 - user code: anything it raises is reported under its name
        detail = " ".join(str(exc).split())[:300]
        raise RewardError(f"reward function {name!r} raised {type(exc).__name__}: {detail}") from exc
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise RewardError(f"reward function {name!r} must return a list of numbers, one per rollout ({exc})") from exc
    if len(values) != len(completions):
        raise RewardError(f"reward function {name!r} returned {len(values)} values for {len(completions)} rollouts")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise RewardError(f"reward function {name!r} returned non-finite values for rollouts {bad}")
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------------------------- visual reward


@dataclass
class VisualTerms:
    """Per-rollout attention statistics of one scoring forward, float64 [N] each (token_ratios: [T])."""

    ratio: torch.Tensor  # r_visual before gating, as the recipe's `visual_reward` defines it (Eq. 5 by default)
    response_image_mass: torch.Tensor  # mean over response tokens, chosen layers and heads of the image mass
    response_system_mass: torch.Tensor  # the same for the system mass
    prompt_vas: torch.Tensor  # VAS of the prompt (user-turn tokens, all layers, mean of per-head ratios + ε)
    token_ratios: torch.Tensor  # [T]: each response token's Eq. 5 term (mean over the chosen layers), batch-major


class VisualStats:
    """A `collect_masses(reduce=...)` reduction: each layer's mass [B, H, L, 4] -> the head-averaged image and
    system masses of the response tokens (detached, float64) and, with a user mask, a [B] VAS sum.

    What is kept per layer is [B, R] twice (R: from the first response column to the end), never the
    [B, H, L, 4] masses, so every `visual_reward` kind is computed afterwards from the same numbers.

    response_mask: bool [B, L], the response tokens (the query positions r_visual averages over).
    user_mask: bool [B, L] or None, the user-turn tokens (for the prompts' VAS in the logs).
    """

    def __init__(self, response_mask: torch.Tensor, user_mask: Optional[torch.Tensor] = None, eps: float = 1e-6):
        if not isinstance(response_mask, torch.Tensor) or response_mask.dtype != torch.bool or response_mask.dim() != 2:
            raise ValueError("VisualStats: response_mask must be a bool [B, L] tensor")
        if user_mask is not None and (user_mask.dtype != torch.bool or user_mask.shape != response_mask.shape):
            raise ValueError(
                f"VisualStats: user_mask must be bool of shape {tuple(response_mask.shape)}, got "
                f"{user_mask.dtype} {tuple(user_mask.shape)}"
            )
        if not (isinstance(eps, float) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"VisualStats: eps must be a float > 0, got {eps!r}")
        columns = torch.nonzero(response_mask.any(0)).flatten()
        self.start = int(columns.min()) if columns.numel() else response_mask.shape[1]
        self.shape = tuple(response_mask.shape)
        self.response = response_mask[:, self.start :].to(torch.float64)  # [B, R]
        self.user = None if user_mask is None else user_mask.to(torch.float64)  # [B, L]
        self.eps = eps

    def __call__(self, mass: torch.Tensor) -> Dict[str, torch.Tensor]:
        B, H, L, G = mass.shape
        if (B, L) != self.shape:
            raise ValueError(f"VisualStats: masses of {B} sequences × {L} queries, response mask {self.shape}")
        head_mean = mass[:, :, self.start :].detach().to(torch.float64).mean(1)  # [B, R, G]
        resp = self.response.to(head_mean.device)  # [B, R]
        out = {
            "image": head_mean[..., _VISUAL] * resp,  # [B, R]
            "system": head_mean[..., _SYSTEM] * resp,  # [B, R]
        }
        if self.user is not None:
            m = mass.detach().to(torch.float64)  # [B, H, L, G]
            per_head = m[..., _VISUAL] / (m[..., _SYSTEM] + self.eps)  # [B, H, L]
            out["vas"] = (per_head.mean(1) * self.user.to(m.device)).sum(-1)  # [B]
        return out


def visual_terms(
    per_layer: List[Dict[str, torch.Tensor]],
    response_mask: torch.Tensor,
    user_mask: Optional[torch.Tensor] = None,
    layers: Optional[Sequence[int]] = None,
    *,
    eps: float = 1e-6,
    kind: str = "ratio",
    cap: Optional[float] = None,
) -> VisualTerms:
    """Combine the per-layer `VisualStats` values (in layer order) into the per-rollout terms, over `layers`
    (default all) for the response statistics; the prompts' VAS always spans all layers.

    r_visual is `avar_ops.method.visual_reward(kind=kind, cap=cap)` of the head-averaged masses: "ratio"
    (Eq. 5), "capped_ratio", "ratio_of_sums" or "image_mass". A rollout with no response token gets 0."""
    from avar_ops.core import NUM_GROUPS
    from avar_ops.method import visual_reward, visual_token_ratios

    n_layers = len(per_layer)
    chosen = list(range(n_layers)) if layers is None else list(layers)
    if not chosen or any(not 0 <= i < n_layers for i in chosen):
        raise ValueError(f"visual_terms: layers must be a non-empty subset of [0, {n_layers}), got {layers}")
    image = torch.stack([per_layer[i]["image"].cpu() for i in chosen])  # [NL, B, R]
    system = torch.stack([per_layer[i]["system"].cpu() for i in chosen])  # [NL, B, R]
    NL, B, R = image.shape
    masses = torch.zeros(NL, B, 1, R, NUM_GROUPS, dtype=torch.float64)  # [NL, B, 1, R, 4]: one "head", the mean
    masses[..., _VISUAL] = image[:, :, None]
    masses[..., _SYSTEM] = system[:, :, None]
    resp = response_mask[:, response_mask.shape[1] - R :].cpu()  # [B, R]
    ratio = visual_reward(masses, resp, eps, empty="zero", kind=kind, cap=cap).to(torch.float64)  # [N]
    n_resp = resp.sum(-1).to(torch.float64).clamp(min=1.0)  # [N]
    if user_mask is not None:
        total = torch.stack([per_layer[i]["vas"].cpu() for i in range(n_layers)]).mean(0)  # [N]
        vas = total / user_mask.sum(-1).to(torch.float64).cpu().clamp(min=1.0)
    else:
        vas = torch.full_like(ratio, float("nan"))
    return VisualTerms(
        ratio=ratio,
        response_image_mass=image.mean(0).sum(-1) / n_resp,
        response_system_mass=system.mean(0).sum(-1) / n_resp,
        prompt_vas=vas,
        token_ratios=visual_token_ratios(masses, resp, eps),
    )


# ----------------------------------------------------------------------------------------------- combination


@dataclass
class RewardBreakdown:
    """Every term of r_total per rollout, float64 [N] each."""

    total: torch.Tensor
    accuracy: torch.Tensor
    format: torch.Tensor
    visual_raw: torch.Tensor  # before gating and cap
    visual: torch.Tensor  # after gating on correctness and the cap: what λ_v multiplies
    correct: torch.Tensor  # bool [N]
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)  # user reward functions, unweighted


def combine_rewards(
    accuracy: torch.Tensor,
    fmt: torch.Tensor,
    visual_raw: torch.Tensor,
    *,
    lambda_visual: float = 0.3,
    lambda_format: float = 0.1,
    visual_reward_max: Optional[float] = None,
    correct: Optional[torch.Tensor] = None,
    extras: Optional[Dict[str, torch.Tensor]] = None,
    extra_weights: Optional[Dict[str, float]] = None,
) -> RewardBreakdown:
    """r_total = r_acc + λ_v·r_visual + λ_f·r_format + Σ w·extra, with r_visual gated and capped.

    correct: bool [N], the rollouts whose answer is right (default: r_acc >= 1, what the built-in r_acc gives a
    correct answer). visual_reward_max: cap on r_visual (None: no cap, the paper's setting).
    """
    n = accuracy.shape[0]
    for name, t in (("fmt", fmt), ("visual_raw", visual_raw)):
        if t.shape != (n,):
            raise ValueError(f"combine_rewards: {name} must have shape ({n},) like accuracy, got {tuple(t.shape)}")
    if visual_reward_max is not None and not visual_reward_max > 0:
        raise ValueError(f"combine_rewards: visual_reward_max must be > 0 or None, got {visual_reward_max!r}")
    accuracy, fmt, visual_raw = (t.to(torch.float64).cpu() for t in (accuracy, fmt, visual_raw))
    correct = (accuracy >= 1.0) if correct is None else correct.cpu().bool()
    visual = visual_raw if visual_reward_max is None else visual_raw.clamp(max=float(visual_reward_max))
    visual = torch.where(correct, visual, torch.zeros_like(visual))
    total = accuracy + lambda_visual * visual + lambda_format * fmt
    extras = dict(extras or {})
    weights = dict(extra_weights or {})
    for name, values in extras.items():
        total = total + float(weights.get(name, 1.0)) * values.to(torch.float64).cpu()
    return RewardBreakdown(
        total=total, accuracy=accuracy, format=fmt, visual_raw=visual_raw, visual=visual, correct=correct, extras=extras
    )
