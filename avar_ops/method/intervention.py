"""The training-free intervention: boost image keys and damp system keys at inference.

Every reading of the method is a per-(layer, head, group) logit scale γ and bias β of the avar op
(s = scale·q·k·γ[h, g] + β[h, g]), so the patched model applies it in prefill and in every decode step:

- ``bias``:    the additive logit of ``softmax(QKᵀ·scale + β·VisualMask)``: β_img on image keys, β_sys on
               system keys (β_sys < 0 damps them).
- ``weights``: the paper's reading, image-key weights × (1 + α_img) and system-key weights × (1 − α_sys),
               then renormalised. Renormalising a softmax whose numerators are scaled by c is the softmax of
               the logits plus log c, so this is exactly β_img = log(1 + α_img), β_sys = log(1 − α_sys).
- ``logits``:  the same α on the logits (PAI-style amplification): γ_img = 1 + α_img, γ_sys = 1 − α_sys.

Tables are identity (γ = 1, β = 0) outside the selected layers and heads.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from avar_ops.core import NUM_GROUPS, Group, select_indices
from avar_ops.hf import apply as patch_model
from avar_ops.hf import attention_layer_indices, patched

MODES = ("weights", "logits", "bias")
# Bound on |β| and γ in the tables. A logit offset of 1e4 already turns a group's weights into exactly 0 or all
# of the row (exp(-1e4) underflows even float64), so larger values change nothing but the risk that
# scale·q·k·γ + β overflows float32 (3.4e38) in the kernel; values beyond it are refused, not clipped.
MAX_TABLE_VALUE = 1e4


@dataclass(frozen=True)
class InterventionTables:
    """Per-layer tables for the patch: None when that reading leaves the quantity at its identity."""

    bias: Optional[torch.Tensor]  # float32 [num_layers, H, G] or None (all zero)
    logit_scale: Optional[torch.Tensor]  # float32 [num_layers, H, G] or None (all one)
    layers: tuple  # the layer indices whose tables are not the identity


def _check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Intervention.{name}: expected a float, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"Intervention.{name}: expected a finite float, got {value}")
    return float(value)


@dataclass(frozen=True)
class Intervention:
    """One setting of the intervention.

    mode "weights" and "logits" read alpha_img / alpha_sys; mode "bias" reads beta_img / beta_sys.
    layers / heads: indices to act on (None = all).
    """

    mode: str = "weights"
    alpha_img: float = 0.0
    alpha_sys: float = 0.0
    beta_img: float = 0.0
    beta_sys: float = 0.0
    layers: Optional[tuple] = field(default=None)
    heads: Optional[tuple] = field(default=None)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Intervention.mode: expected one of {MODES}, got {self.mode!r}")
        for name in ("alpha_img", "alpha_sys", "beta_img", "beta_sys"):
            object.__setattr__(self, name, _check_finite(name, getattr(self, name)))
        if self.mode in ("weights", "logits"):
            if self.alpha_img <= -1.0:
                raise ValueError(
                    f"Intervention.alpha_img: image weights are scaled by 1 + alpha_img, which must be > 0; "
                    f"expected alpha_img > -1, got {self.alpha_img}"
                )
            if self.alpha_sys >= 1.0:
                raise ValueError(
                    f"Intervention.alpha_sys: system weights are scaled by 1 - alpha_sys, which must be > 0; "
                    f"expected alpha_sys < 1, got {self.alpha_sys}"
                )
        elif self.alpha_img != 0.0 or self.alpha_sys != 0.0:
            raise ValueError(
                f"Intervention: mode 'bias' reads beta_img / beta_sys, but alpha_img={self.alpha_img}, "
                f"alpha_sys={self.alpha_sys} were given; use mode 'weights' or 'logits' for alphas"
            )
        if self.mode != "bias" and (self.beta_img != 0.0 or self.beta_sys != 0.0):
            raise ValueError(
                f"Intervention: mode {self.mode!r} reads alpha_img / alpha_sys, but beta_img={self.beta_img}, "
                f"beta_sys={self.beta_sys} were given; use mode 'bias' for additive logits"
            )
        names = ("beta_img", "beta_sys") if self.mode == "bias" else ("alpha_img", "alpha_sys")
        bias, gamma = self.group_bias(), self.group_logit_scale()
        for group, name in zip((Group.VISUAL, Group.SYSTEM), names):
            kind, value = ("logit scale γ", gamma[group]) if self.mode == "logits" else ("logit offset β", bias[group])
            if not abs(value) <= MAX_TABLE_VALUE:
                raise ValueError(
                    f"Intervention.{name}: {getattr(self, name):g} in mode {self.mode!r} is a {kind} of {value:.4g}; "
                    f"expected at most {MAX_TABLE_VALUE:g} in size (that already moves all attention onto or off "
                    "the group; larger values overflow float32 in the kernel)"
                )
        for name in ("layers", "heads"):
            v = getattr(self, name)
            if isinstance(v, (str, bytes)):
                raise TypeError(f"Intervention.{name}: expected None or a sequence of ints, got the string {v!r}")
            if v is not None:
                object.__setattr__(self, name, (v,) if isinstance(v, int) else tuple(v))

    @property
    def is_identity(self) -> bool:
        return self.alpha_img == 0.0 and self.alpha_sys == 0.0 and self.beta_img == 0.0 and self.beta_sys == 0.0

    def group_bias(self) -> list:
        """β per group [G] on the acted-on heads."""
        b = [0.0] * NUM_GROUPS
        if self.mode == "bias":
            b[Group.VISUAL], b[Group.SYSTEM] = self.beta_img, self.beta_sys
        elif self.mode == "weights":
            b[Group.VISUAL], b[Group.SYSTEM] = math.log1p(self.alpha_img), math.log1p(-self.alpha_sys)
        return b

    def group_logit_scale(self) -> list:
        """γ per group [G] on the acted-on heads."""
        g = [1.0] * NUM_GROUPS
        if self.mode == "logits":
            g[Group.VISUAL], g[Group.SYSTEM] = 1.0 + self.alpha_img, 1.0 - self.alpha_sys
        return g

    def head_tables(self, num_heads: int, dtype: torch.dtype = torch.float32):
        """(bias [H, G], logit_scale [H, G]) for one acted-on layer (values computed in float64, then cast)."""
        heads = select_indices(self.heads, num_heads, "Intervention.heads")
        on = torch.zeros(num_heads, 1, dtype=torch.float64)  # [H, 1]: 1 on the acted-on heads
        on[heads if heads is not None else slice(None)] = 1.0
        bias = on * torch.tensor(self.group_bias(), dtype=torch.float64)  # [H, G]
        gamma = 1.0 + on * (torch.tensor(self.group_logit_scale(), dtype=torch.float64) - 1.0)  # [H, G]
        return bias.to(dtype), gamma.to(dtype)

    def tables(self, num_layers: int, num_heads: int, dtype: torch.dtype = torch.float32) -> InterventionTables:
        """Per-layer tables [num_layers, H, G]; identity outside the selected layers and heads.

        The op takes float32 tables; float64 ones serve the float64 reference.
        """
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"Intervention.tables: num_layers must be a positive int, got {num_layers!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"Intervention.tables: num_heads must be a positive int, got {num_heads!r}")
        layers = select_indices(self.layers, num_layers, "Intervention.layers")
        layers = list(range(num_layers)) if layers is None else layers
        bias = torch.zeros(num_layers, num_heads, NUM_GROUPS, dtype=dtype)  # [NL, H, G]
        gamma = torch.ones(num_layers, num_heads, NUM_GROUPS, dtype=dtype)  # [NL, H, G]
        head_bias, head_gamma = self.head_tables(num_heads, dtype)
        bias[layers] = head_bias
        gamma[layers] = head_gamma
        uses_bias = self.mode in ("bias", "weights") and not self.is_identity
        uses_gamma = self.mode == "logits" and not self.is_identity
        return InterventionTables(
            bias=bias if uses_bias else None,
            logit_scale=gamma if uses_gamma else None,
            layers=tuple(layers) if not self.is_identity else (),
        )

    def describe(self) -> str:
        where = ""
        if self.layers is not None:
            where += f" layers={list(self.layers)}"
        if self.heads is not None:
            where += f" heads={list(self.heads)}"
        if self.mode == "bias":
            return f"bias β_img={self.beta_img:g} β_sys={self.beta_sys:g}{where}"
        return f"{self.mode} α_img={self.alpha_img:g} α_sys={self.alpha_sys:g}{where}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["heads"] = list(self.heads) if self.heads is not None else None
        return d


def reweight_probabilities(
    p: torch.Tensor,  # [..., Lk] attention weights (rows sum to 1 or 0)
    key_group: torch.Tensor,  # [..., Lk] broadcastable int group ids
    alpha_img: float,
    alpha_sys: float,
) -> torch.Tensor:
    """The paper's reading applied literally to materialised weights: scale, then renormalise each row.

    Used as the independent definition that the "weights" tables are checked against; rows with no mass stay 0.
    """
    factor = torch.ones_like(p)
    factor = torch.where(key_group == Group.VISUAL, torch.full_like(p, 1.0 + alpha_img), factor)
    factor = torch.where(key_group == Group.SYSTEM, torch.full_like(p, 1.0 - alpha_sys), factor)
    scaled = p * factor  # [..., Lk]
    total = scaled.sum(dim=-1, keepdim=True)  # [..., 1]
    return torch.where(total > 0, scaled / torch.where(total > 0, total, torch.ones_like(total)), scaled)


def _num_layers_heads(model) -> tuple:
    """(softmax-attention layers, heads): the shape the patch's tables take for this model."""
    cfg = model.config
    text = getattr(cfg, "text_config", None) or cfg
    return len(attention_layer_indices(cfg)), int(text.num_attention_heads)


def patch_tables(model, intervention: Optional[Intervention]) -> dict:
    """Keyword arguments (bias, logit_scale) that make `avar_ops.hf.apply` / `patched` apply
    the intervention to this model; empty for None."""
    if intervention is None:
        return {}
    if not isinstance(intervention, Intervention):
        raise TypeError(f"intervention: expected an Intervention or None, got {type(intervention).__name__}")
    num_layers, num_heads = _num_layers_heads(model)
    t = intervention.tables(num_layers, num_heads)
    return {"bias": t.bias, "logit_scale": t.logit_scale}


def apply(model, intervention: Intervention, *, tokenizer=None):
    """Patch `model` (any supported family) so that every forward and generate() runs with this intervention.

    Returns the patch handle (call `.revert()` to undo). An identity intervention still patches, so that
    masses are collected the same way with and without it.
    """
    if not isinstance(intervention, Intervention):
        raise TypeError(f"intervention.apply: expected an Intervention, got {type(intervention).__name__}")
    return patch_model(model, tokenizer, **patch_tables(model, intervention))


@contextlib.contextmanager
def intervened(model, processor, intervention: Optional[Intervention] = None):
    """`avar_ops.hf.patched` with this intervention's tables (None: plain avar attention).

    A model the caller already patched is used as it is; passing an intervention for it is then an error.
    """
    with patched(model, processor, **patch_tables(model, intervention)) as handle:
        yield handle


def generate(
    model,
    processor,
    inputs: dict,
    *,
    intervention: Optional[Intervention] = None,
    max_new_tokens: int = 32,
    streamer=None,
) -> List[List[int]]:
    """Greedy generation from prepared model inputs (a processor's output) under the intervention.

    The intervention acts in the prefill and in every decode step (the patch keeps the groups of the cached
    positions). `streamer` is handed to `model.generate` (e.g. a progress display). Returns, per row, the
    generated ids up to and including the first end-of-turn token.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    tok = getattr(processor, "tokenizer", processor)
    stop = {
        t
        for t in (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"))
        if t is not None
    }
    prompt_len = inputs["input_ids"].shape[1]
    with intervened(model, processor, intervention), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
    rows = []
    for row in out[:, prompt_len:].tolist():
        tokens = []
        for t in row:
            tokens.append(t)
            if t in stop:
                break
        rows.append(tokens)
    return rows
