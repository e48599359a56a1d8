"""Run a vision-language model's text attention through `avar_ops.attention`: token groups, bias, masses.

Public surface (what the VAS measurement, the intervention and the trainers use):

    handle = apply(model, processor, bias=None, logit_scale=None, layers=None)   # any supported family
    with collect_masses(model) as rec:        # or collect_masses(model, reduce=fn)
        model(**inputs)
    rec.masses                                # per attention layer, in order: float32 [B, H, L, 4] (or fn(mass))
    handle.revert()                           # or revert(model)
    get_handle(model) / is_patched(model)     # the live handle of a patched model (None / False otherwise)
    handle.tables(layer)                      # (bias [H, 4], logit_scale [H, 4]) that layer runs with
    handle.attention_layers                   # decoder-layer index of each attention layer

What differs between families (where the decoder and its attention layers are, which layers are softmax
attention, the placeholder ids) is in `avar_ops.hf.families`, one small module per family; the groups come from
the layout learned from the processor's chat template (`avar_ops.hf.chat_template`). Layers are counted over the
softmax-attention layers only: all of them for every family but Qwen3.5, whose linear-attention layers keep their
own implementation and have no masses.

How it hooks in (transformers >= 5.17, < 6):

- The text decoder's config gets `_attn_implementation = "avar"`, a name registered with transformers'
  `AttentionInterface` (the attention function) and `AttentionMaskInterface` (its mask function). The vision
  tower has its own config and keeps its own attention.
- Padding travels as key group -1 rather than as a mask: the mask function builds nothing (it only refuses
  mask patterns the kernel does not implement, such as packed sequences), and causality is the kernel's own,
  bottom-right aligned, which serves prefill and decoding alike.
- A forward pre-hook on the family's base model (`Qwen2_5_VLModel`, …) sees every forward, including each
  step of `generate()`. It keeps the input ids of everything in each KV cache, tied to that cache object (held
  weakly, so the ids go when the cache goes; a cache the model creates inside a forward is picked up by a
  forward hook), so that two conversations with caches of the same length, used in turn, each get their own
  groups. On a fresh forward (empty or no cache) a cache's history starts from the forward's ids; on a cached
  step the new ids are appended to that cache's history (a cache cropped to fewer positions keeps the matching
  prefix) and the groups of the whole history are recomputed from the tokens and the full attention mask
  (cheap: a few vectorised passes over [B, L]). A cache with positions the patch never saw is refused. Groups
  come from `token_groups` when a processor is given, or from groups set with `handle.set_key_groups`;
  positions past the explicit groups (generated tokens) are group 0.
- The attention function reads the groups, the layer's bias / logit scale and whether masses are being
  collected from the patch state attached to each attention module. Tables (and groups set with
  `set_key_groups`) given on the host are copied to the model's device once (in the first forward there, so
  a CUDA graph is captured after a warm-up forward), and again only after an in-place change; a table that
  requires grad is moved in every forward, so a trainable one belongs on the model's device.
- A cached decode step reads no tensor value on the host (with the op's input checks off, their default on
  CUDA), so on a GPU it can be captured in a CUDA graph: the hooks recompute the groups of the whole history
  with tensor operations only. A graph replays the step of its capture (same cache position and objects):
  the patch's history of a cache grows by concatenation, as transformers' dynamic cache does.

Limitations, each raising a clear error: packed sequences (positions restarting inside a row without an
attention mask), sliding-window layers, attention dropout, 4D custom masks, masks prepared in advance (static
cache), `output_attentions=True`.
Beam search that reorders the cache keeps the group history of the original rows; that is exact as long as
generated tokens are all group 0 (they are, inside an assistant turn). Qwen2.5-VL itself keeps the rope
deltas of its last multimodal prefill on the model (not on the cache), so conversations with images that
are stepped in turn need their position_ids passed explicitly; that is transformers' state, not the patch's.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Union

import torch

from avar_ops.core import NUM_GROUPS, attention, select_indices
from avar_ops.hf.token_groups import template_tokens, token_groups

__all__ = [
    "apply",
    "apply_to_qwen2_5_vl",
    "revert",
    "get_handle",
    "is_patched",
    "patched",
    "collect_masses",
    "capture_attention",
    "PatchHandle",
    "MassRecord",
    "AttentionCapture",
    "LayerInputs",
    "SUPPORTED_TRANSFORMERS",
]

SUPPORTED_TRANSFORMERS = (">=5.17", "<6")
_MIN_VERSION, _MAX_VERSION = (5, 17), (6, 0)
ATTN_IMPLEMENTATION = "avar"

TableLike = Union[torch.Tensor, float, Iterable]


# ---------------------------------------------------------------------------------------------------------------
# Version and model checks


def _check_transformers_version() -> None:
    import transformers
    from packaging.version import InvalidVersion, Version

    version = transformers.__version__
    try:
        parsed = Version(version)
    except InvalidVersion as exc:
        raise RuntimeError(f"avar patch: cannot parse the transformers version {version!r}") from exc
    release = parsed.release + (0,) * (2 - len(parsed.release))
    if not (_MIN_VERSION <= release[:2] < _MAX_VERSION):
        raise RuntimeError(
            f"avar patch supports transformers {','.join(SUPPORTED_TRANSFORMERS)}, found {version}: the attention "
            f"interface and Qwen2.5-VL's modelling code it hooks into are only checked for that range"
        )


# ---------------------------------------------------------------------------------------------------------------
# Bias / logit-scale tables


def _layer_tables(
    value: Optional[TableLike], name: str, num_layers: int, num_heads: int, layers: Optional[List[int]]
) -> List[Optional[torch.Tensor]]:
    """Per layer: a float32 table [G] or [H, G] for `avar_ops.attention`, or None (layer not biased/scaled)."""
    if value is None:
        return [None] * num_layers
    table = value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float32)
    if table.dtype != torch.float32:
        table = table.float()
    shapes = {1: (NUM_GROUPS,), 2: (num_heads, NUM_GROUPS), 3: (num_layers, num_heads, NUM_GROUPS)}
    if table.dim() not in shapes or tuple(table.shape) != shapes[table.dim()]:
        raise ValueError(
            f"avar patch: {name} must have shape [{NUM_GROUPS}], [{num_heads}, {NUM_GROUPS}] or "
            f"[{num_layers}, {num_heads}, {NUM_GROUPS}] (groups; heads, groups; layers, heads, groups), "
            f"got {tuple(table.shape)}"
        )
    if not torch.isfinite(table.detach()).all():
        raise ValueError(f"avar patch: {name} must be finite, got {table.detach().cpu().tolist()}")
    selected = range(num_layers) if layers is None else layers
    out: List[Optional[torch.Tensor]] = [None] * num_layers
    for layer in selected:
        out[layer] = table[layer] if table.dim() == 3 else table
    return out


# ---------------------------------------------------------------------------------------------------------------
# State shared by the hook and the attention function


@dataclass
class _Collector:
    reduce: Optional[Callable]
    steps: List[dict] = field(default_factory=list)  # one {layer: mass or reduce(mass)} per forward


@dataclass
class _PatchState:
    num_layers: int  # softmax-attention layers (tables, masses and `layers=` count these, in order)
    num_heads: int
    template: Optional[object]  # groups.TemplateTokens, or None when groups are set explicitly
    bias: List[Optional[torch.Tensor]]
    logit_scale: List[Optional[torch.Tensor]]
    layer_pos: dict = field(default_factory=dict)  # decoder layer index -> position among the attention layers
    explicit_groups: Optional[torch.Tensor] = None  # int8 [B, N]
    # KV cache object -> int64 [B, P]: the input ids of every position that cache holds.
    histories: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    pending_ids: Optional[torch.Tensor] = None  # [B, L] ids of a forward whose cache the model creates itself
    key_group: Optional[torch.Tensor] = None  # int8 [B, P + L] groups of the current forward's keys
    collectors: List[_Collector] = field(default_factory=list)
    captures: List["AttentionCapture"] = field(default_factory=list)
    # (id of a table or of explicit_groups, device) -> (that tensor, its version, its copy on the device)
    device_copies: dict = field(default_factory=dict)


def _on_device(state: _PatchState, tensor: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """`tensor` on `device`, copied there once rather than in every forward and layer.

    A copy from host memory makes the host wait for the GPU (and cannot be captured in a CUDA graph), so the
    copy is kept and made again only when the tensor changes in place (its version counter moves). A tensor
    that requires grad is moved on every call, so that each forward gets its own autograd edge to it.
    """
    if tensor is None or tensor.device == device:
        return tensor
    if tensor.requires_grad or tensor.is_inference():
        return tensor.to(device)
    key = (id(tensor), device)
    kept = state.device_copies.get(key)
    if kept is None or kept[0] is not tensor or kept[1] != tensor._version:
        kept = (tensor, tensor._version, tensor.to(device))
        state.device_copies[key] = kept
    return kept[2]


def _cached_ids(state: _PatchState, cache, past_len: int, batch: int) -> torch.Tensor:
    """[B, past_len]: the ids of the positions `cache` holds, as this patch saw them go in."""
    try:
        seen = state.histories.get(cache) if cache is not None else None
    except TypeError:  # a cache object that cannot be weakly referenced or hashed
        seen = None
    if seen is None or seen.shape[0] != batch or seen.shape[1] < past_len:
        got = "no ids" if seen is None else f"ids {tuple(seen.shape)}"
        raise RuntimeError(
            f"avar patch: this KV cache holds {past_len} positions for batch {batch}, but the patch saw {got} go into "
            "it; a cache filled before the patch (or by another model, or reordered) cannot be grouped"
        )
    return seen[:, :past_len]


def _groups_for_forward(
    state: _PatchState, input_ids, attention_mask, past_len: int, new_len: int, batch: int, device, cache=None
) -> torch.Tensor:
    """int8 [B, past_len + new_len]: the key groups of this forward, keeping the cached positions' history."""
    total = past_len + new_len
    if attention_mask is not None:
        if isinstance(attention_mask, dict):
            raise NotImplementedError(
                "avar patch: this forward got masks prepared in advance (generate with a static cache or a "
                "compiled forward), which no longer say where the padding is; use the default dynamic cache"
            )
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            got = (
                type(attention_mask).__name__
                if not isinstance(attention_mask, torch.Tensor)
                else f"a {attention_mask.dim()}D tensor"
            )
            raise NotImplementedError(
                f"avar patch: attention_mask must be None or a 2D [batch, cached + new] padding mask, got {got}"
            )
        if tuple(attention_mask.shape) != (batch, total):
            raise ValueError(
                f"avar patch: attention_mask must be [batch, cached + new] = [{batch}, {total}], "
                f"got {tuple(attention_mask.shape)}"
            )
        valid = attention_mask.to(device=device).bool()  # [B, P + L]
    else:
        valid = None

    if state.explicit_groups is not None:
        groups = _on_device(state, state.explicit_groups, device)  # [B, N]
        if groups.shape[0] != batch:
            raise ValueError(
                f"avar patch: groups set with set_key_groups have batch {groups.shape[0]}, the forward has {batch}"
            )
        if groups.shape[1] >= total:
            groups = groups[:, :total]
        else:
            groups = torch.nn.functional.pad(groups, (0, total - groups.shape[1]), value=0)  # generated: group 0
        return groups if valid is None else groups.masked_fill(~valid, -1)

    if state.template is None:
        raise RuntimeError(
            "avar patch: no token groups for this forward: pass the processor to avar_ops.hf.apply or set them "
            "with handle.set_key_groups(key_group)"
        )
    if input_ids is None:
        raise ValueError(
            "avar patch: groups are computed from input_ids, but this forward got inputs_embeds only; set them "
            "with handle.set_key_groups(key_group)"
        )
    if past_len == 0:
        history = input_ids  # [B, L]
    else:
        seen = _cached_ids(state, cache, past_len, batch)  # [B, P]
        history = torch.cat([seen, input_ids.to(seen.device)], dim=1)  # [B, P + L]
    if cache is not None:
        try:
            state.histories[cache] = history
        except TypeError:
            pass  # not weakly referenceable: its next cached step is refused by _cached_ids
    else:
        state.pending_ids = history
    return token_groups(history, state.template, valid).key_group


def _pre_forward_hook(module, args, kwargs):
    state: _PatchState = module._avar_state
    bound = module._avar_signature.bind_partial(module, *args, **kwargs).arguments
    input_ids = bound.get("input_ids")
    embeds = bound.get("inputs_embeds")
    if input_ids is None and embeds is None:
        return None  # the model raises its own error
    ref = input_ids if input_ids is not None else embeds
    batch, new_len = ref.shape[0], ref.shape[1]
    cache = bound.get("past_key_values")
    past_len = int(cache.get_seq_length()) if cache is not None else 0
    state.pending_ids = None
    state.key_group = _groups_for_forward(
        state, input_ids, bound.get("attention_mask"), past_len, new_len, batch, ref.device, cache
    )
    for collector in state.collectors:
        collector.steps.append({})
    return None


def _post_forward_hook(module, args, kwargs, output):
    """Tie the ids of a forward that got no cache object to the cache the model created for it (if any)."""
    state: _PatchState = module._avar_state
    pending, state.pending_ids = state.pending_ids, None
    cache = getattr(output, "past_key_values", None)
    if pending is not None and cache is not None:
        try:
            state.histories[cache] = pending
        except TypeError:
            pass  # not weakly referenceable: its next cached step is refused by _cached_ids
    return None


# ---------------------------------------------------------------------------------------------------------------
# The attention and mask functions registered with transformers


def _avar_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, sliding_window=None, **kwargs
):
    """transformers attention function: query [B, H, Lq, D], key/value [B, H_kv, Lk, D] -> ([B, Lq, H, D], None)."""
    state: Optional[_PatchState] = getattr(module, "_avar_state", None)
    if state is None:
        raise RuntimeError(
            f"avar attention: {type(module).__name__} is not patched; use avar_ops.hf.apply "
            "instead of setting attn_implementation='avar' by hand"
        )
    if dropout:
        raise NotImplementedError(f"avar attention: attention dropout is not supported, got dropout={dropout}")
    if sliding_window is not None:
        raise NotImplementedError(f"avar attention: sliding-window layers are not supported (window {sliding_window})")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("avar attention does not return attention maps; use collect_masses instead")
    if attention_mask is not None:
        raise RuntimeError("avar attention: expected no mask (padding travels as key group -1), got one")
    groups = state.key_group  # [B, P + L]
    if groups is None:
        raise RuntimeError("avar attention: no token groups; the model's forward pre-hook did not run")
    B, Lk = query.shape[0], key.shape[2]
    if groups.shape != (B, Lk):
        raise RuntimeError(
            f"avar attention: {B}×{Lk} keys but groups for {tuple(groups.shape)}; the layer was called outside "
            "a forward of the patched model, or its cache was changed outside one"
        )
    layer = state.layer_pos[module.layer_idx]
    bias = _on_device(state, state.bias[layer], query.device)
    logit_scale = _on_device(state, state.logit_scale[layer], query.device)
    want_mass = bool(state.collectors)
    res = attention(
        query.transpose(1, 2),  # [B, Lq, H, D] view
        key.transpose(1, 2),  # [B, Lk, H_kv, D] view
        value.transpose(1, 2),  # [B, Lk, H_kv, D] view
        groups.to(query.device),
        bias,
        logit_scale=logit_scale,
        scale=scaling,
        causal=True,
        return_mass=want_mass,
    )
    if want_mass:
        for collector in state.collectors:
            step = collector.steps[-1] if collector.steps else None
            # A layer seen twice in one forward is activation-checkpoint recomputation: keep the first.
            if step is not None and layer not in step:
                step[layer] = res.mass if collector.reduce is None else collector.reduce(res.mass)
    for capture in state.captures:
        if layer in capture.layers and layer not in capture.inputs:
            capture.inputs[layer] = LayerInputs(
                query=query.detach().transpose(1, 2),
                key=key.detach().transpose(1, 2),
                lse=res.lse.detach(),
                key_group=groups.to(query.device),
                bias=bias,
                logit_scale=logit_scale,
                scale=scaling,
            )
    return res.out, None  # out [B, Lq, H, D]


def _avar_mask(
    batch_size=None,
    q_length=None,
    kv_length=None,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask=None,
    **kwargs,
):
    """transformers mask function: builds no mask (causality is the kernel's, padding is key group -1)."""
    from transformers.masking_utils import causal_mask_function

    if mask_function is not None and mask_function is not causal_mask_function:
        raise NotImplementedError(
            "avar attention implements plain causal attention only; this forward asks for another mask pattern "
            "(packed sequences, i.e. position_ids restarting inside a row without an attention_mask, or a custom "
            "mask overlay)"
        )
    return None


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _avar_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _avar_mask)
    _REGISTERED = True


# ---------------------------------------------------------------------------------------------------------------
# Public API


class PatchHandle:
    """What `apply` returns: read or change bias / groups, or revert the patch."""

    def __init__(self, model, base, text_model, family, attn_modules, state: _PatchState, hooks, previous_impl):
        self._model, self._base, self._text, self._state = model, base, text_model, state
        self._hooks, self._previous_impl = hooks, previous_impl
        self._attn_modules = attn_modules
        self.family = family

    @property
    def active(self) -> bool:
        return self._hooks is not None

    @property
    def attention_layers(self) -> List[int]:
        """Decoder-layer indices of the softmax-attention layers, in the order tables and masses count them."""
        return sorted(self._state.layer_pos, key=self._state.layer_pos.get)

    @property
    def num_layers(self) -> int:
        """The number of softmax-attention layers (the L of [L, H, 4] tables and of the masses list)."""
        return self._state.num_layers

    @property
    def num_heads(self) -> int:
        return self._state.num_heads

    def tables(self, layer: int):
        """(bias, logit_scale) of one decoder layer as its attention uses them: float32 [H, 4] each.

        A layer without a bias reads as zeros and one without a logit scale as ones (what the op does with
        none); a [4] table is expanded over heads. The tensors are detached copies on the tables' device, so
        they can be handed to `avar_ops.attention` / `attention_key_mass`, but changing them changes nothing
        (use `set_bias` for that).
        """
        self._require_active()
        s = self._state
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"PatchHandle.tables: layer must be an int, got {layer!r} ({type(layer).__name__})")
        (layer,) = select_indices(layer, s.num_layers, "PatchHandle.tables: layer")

        given = [t for t in (s.bias[layer], s.logit_scale[layer]) if t is not None]
        device = given[0].device if given else torch.device("cpu")

        def full(table: Optional[torch.Tensor], identity: float) -> torch.Tensor:  # -> [H, G]
            if table is None:
                return torch.full((s.num_heads, NUM_GROUPS), identity, dtype=torch.float32, device=device)
            return table.detach().to(torch.float32).expand(s.num_heads, NUM_GROUPS).clone()

        return full(s.bias[layer], 0.0), full(s.logit_scale[layer], 1.0)

    def set_bias(
        self,
        bias: Optional[TableLike] = None,
        logit_scale: Optional[TableLike] = None,
        layers: Optional[Iterable[int]] = None,
    ) -> None:
        """Replace the bias and logit-scale tables (same shapes and meaning as in `apply`)."""
        self._require_active()
        s = self._state
        layers = select_indices(layers, s.num_layers, "avar patch: layers")
        s.bias = _layer_tables(bias, "bias", s.num_layers, s.num_heads, layers)
        s.logit_scale = _layer_tables(logit_scale, "logit_scale", s.num_layers, s.num_heads, layers)
        s.device_copies.clear()

    def set_key_groups(self, key_group: Optional[torch.Tensor]) -> None:
        """Use these groups (int8 [B, N], -1..3) instead of computing them from input_ids; None to go back.

        They apply to every following forward whose batch is B: positions past N (tokens generated after a
        prompt of N) are group 0, and padding from the forward's attention_mask is -1 whatever is set here.
        """
        self._require_active()
        if key_group is not None:
            if not isinstance(key_group, torch.Tensor) or key_group.dim() != 2:
                got = tuple(key_group.shape) if isinstance(key_group, torch.Tensor) else type(key_group).__name__
                raise ValueError(f"set_key_groups: key_group must be a [B, N] tensor, got {got}")
            if key_group.dtype.is_floating_point or key_group.dtype == torch.bool:
                raise TypeError(f"set_key_groups: key_group must be an integer tensor, got {key_group.dtype}")
            if key_group.numel() and (key_group.min() < -1 or key_group.max() >= NUM_GROUPS):
                raise ValueError(
                    f"set_key_groups: key_group values must be in [-1, {NUM_GROUPS - 1}], got "
                    f"[{int(key_group.min())}, {int(key_group.max())}]"
                )
            key_group = key_group.to(torch.int8)
        s = self._state
        s.device_copies = {k: kept for k, kept in s.device_copies.items() if kept[0] is not s.explicit_groups}
        s.explicit_groups = key_group

    def revert(self) -> None:
        """Restore the model's own attention; the handle is dead afterwards."""
        if self._hooks is None:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = None
        self._text.config._attn_implementation = self._previous_impl
        for module in self._attn_modules:
            del module._avar_state
        for obj in {id(self._model): self._model, id(self._base): self._base}.values():
            for name in ("_avar_state", "_avar_handle", "_avar_signature"):
                if name in obj.__dict__:
                    delattr(obj, name)
        self._state.collectors.clear()
        self._state.captures.clear()
        self._state.histories.clear()
        self._state.device_copies.clear()

    def _require_active(self) -> None:
        if self._hooks is None:
            raise RuntimeError("avar patch: this handle was reverted")


def apply(
    model,
    processor=None,
    *,
    tokenizer=None,
    bias: Optional[TableLike] = None,
    logit_scale: Optional[TableLike] = None,
    layers: Optional[Iterable[int]] = None,
) -> PatchHandle:
    """Route the text decoder's softmax attention of a supported vision-language model through `avar_ops.attention`.

    Args:
        model: a model of a supported family (`avar_ops.hf.supported_families()`; the conditional-generation
            model or its base model), picked from `config.model_type`; anything else raises ValueError naming
            the supported families.
        processor: the processor (or tokenizer) that makes the input ids; groups of every forward are then
            computed from input_ids, by the layout learned from its chat template. Without it, set groups with
            `handle.set_key_groups`. `tokenizer=` is the same argument under its older name.
        bias: additive logit bias per group, [4], per head and group, [H, 4], or per layer, head and group,
            [L, H, 4] (float32; a tensor that requires grad is used as is, so it can be trained). L counts the
            softmax-attention layers only (`handle.attention_layers` maps them to decoder layers; all layers
            but Qwen3.5's linear-attention ones).
        logit_scale: multiplies the scaled logit, s = scale·q·k·logit_scale[h, g] + bias[h, g]; same shapes.
        layers: the attention layers (indices among the L) that get bias and logit_scale (default: all).

    Returns a `PatchHandle` (`.revert()`, `.tables(layer)`, `.set_bias(...)`, `.set_key_groups(...)`,
    `.attention_layers`, `.family`); later `get_handle(model)` finds it again. Raises RuntimeError if the
    installed transformers is outside >=5.17,<6 or the model is already patched.
    """
    from avar_ops.hf.families import family_of

    if processor is not None and tokenizer is not None and processor is not tokenizer:
        raise ValueError("avar patch: pass the processor once (processor= or its older name tokenizer=), not both")
    processor = processor if processor is not None else tokenizer
    _check_transformers_version()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"avar patch: model must be a transformers model, got {type(model).__name__}")
    family = family_of(model)
    base = family.base_model(model)
    if getattr(model, "_avar_state", None) is not None or getattr(base, "_avar_state", None) is not None:
        raise RuntimeError("avar patch: the model is already patched; call revert(model) first")
    text_model = family.text_model(base)
    family.check_model(model, text_model)
    text_config = text_model.config
    decoder_layers = family.attention_layers(text_model)
    if not decoder_layers:
        raise NotImplementedError(f"avar patch: this {family.title} model has no softmax-attention layer")
    attn_modules = [family.attention_module(text_model, i) for i in decoder_layers]
    if any(m.config is not text_config for m in attn_modules):
        raise RuntimeError("avar patch: the decoder layers do not share the text config; cannot switch attention")
    if [m.layer_idx for m in attn_modules] != decoder_layers:
        raise RuntimeError(
            f"avar patch: the {family.title} attention modules do not carry their decoder layer index; cannot tell "
            "which table is whose"
        )
    num_layers, num_heads = len(attn_modules), text_config.num_attention_heads
    layer_list = select_indices(layers, num_layers, "avar patch: layers")
    template = None
    if processor is not None:
        visual = family.visual_token_ids(model.config)
        template = template_tokens(processor, visual_ids=None if hasattr(processor, "image_token") else visual)
        stray = sorted(set(visual) - set(template.visual))
        if visual and stray:
            raise ValueError(
                f"avar patch: the model config's image / video token ids {list(visual)} are not the processor's "
                f"placeholders {list(template.visual)}; processor and model do not belong together"
            )
    state = _PatchState(
        num_layers=num_layers,
        num_heads=num_heads,
        layer_pos={idx: pos for pos, idx in enumerate(decoder_layers)},
        template=template,
        bias=_layer_tables(bias, "bias", num_layers, num_heads, layer_list),
        logit_scale=_layer_tables(logit_scale, "logit_scale", num_layers, num_heads, layer_list),
    )
    _register()
    previous_impl = text_config._attn_implementation
    for module in attn_modules:
        module._avar_state = state
    base._avar_state = state
    base._avar_signature = inspect.signature(type(base).forward)
    hooks = (
        base.register_forward_pre_hook(_pre_forward_hook, with_kwargs=True),
        base.register_forward_hook(_post_forward_hook, with_kwargs=True),
    )
    text_config._attn_implementation = ATTN_IMPLEMENTATION
    handle = PatchHandle(model, base, text_model, family, attn_modules, state, hooks, previous_impl)
    model._avar_state = state
    model._avar_handle = handle
    base._avar_handle = handle
    return handle


def apply_to_qwen2_5_vl(
    model,
    *,
    tokenizer=None,
    bias: Optional[TableLike] = None,
    logit_scale: Optional[TableLike] = None,
    layers: Optional[Iterable[int]] = None,
) -> PatchHandle:
    """`apply` for a Qwen2.5-VL model (`Qwen2_5_VLForConditionalGeneration` or `Qwen2_5_VLModel`; TypeError else)."""
    if getattr(getattr(model, "config", None), "model_type", None) != "qwen2_5_vl":
        raise TypeError(
            "avar patch: model must be a Qwen2_5_VLForConditionalGeneration or Qwen2_5_VLModel, got "
            f"{type(model).__name__} (avar_ops.hf.apply patches every supported family)"
        )
    return apply(model, tokenizer=tokenizer, bias=bias, logit_scale=logit_scale, layers=layers)


def get_handle(model) -> Optional[PatchHandle]:
    """The `PatchHandle` of a patched model (the conditional-generation model or its base model), or None."""
    handle = getattr(model, "_avar_handle", None)
    return handle if isinstance(handle, PatchHandle) and handle.active else None


def is_patched(model) -> bool:
    """Whether `apply` routes this model's attention through avar (and was not reverted)."""
    return get_handle(model) is not None


def revert(model) -> None:
    """Undo `apply` on `model` (RuntimeError if it is not patched)."""
    handle = get_handle(model)
    if handle is None:
        raise RuntimeError(f"avar patch: {type(model).__name__} is not patched")
    handle.revert()


class MassRecord:
    """Masses gathered by `collect_masses`: one entry per decoder layer, per forward."""

    def __init__(self, collector: _Collector, num_layers: int):
        self._collector, self._num_layers = collector, num_layers

    @property
    def steps(self) -> List[list]:
        """Per forward run inside the context (e.g. each step of generate): the per-layer list."""
        out = []
        for step in self._collector.steps:
            missing = [i for i in range(self._num_layers) if i not in step]
            if missing:
                raise RuntimeError(f"collect_masses: layers {missing} did not run in a forward")
            out.append([step[i] for i in range(self._num_layers)])
        return out

    @property
    def masses(self) -> list:
        """The per-layer masses (float32 [B, H, Lq, 4], or reduce(mass)) of the one forward run in the context."""
        steps = self.steps
        if len(steps) != 1:
            raise RuntimeError(
                f"collect_masses: .masses needs exactly one forward inside the context, there were {len(steps)}; "
                "use .steps for several (e.g. generate)"
            )
        return steps[0]


@contextlib.contextmanager
def collect_masses(model, reduce: Optional[Callable[[torch.Tensor], object]] = None):
    """Gather the attention masses of every text-decoder layer during the forwards run inside the context.

    Each mass is float32 [B, H, Lq, 4]: for query i of head h, the attention probability on keys of group
    g (0 other, 1 visual, 2 system, 3 user text); padded queries of a left-padded batch see no key and get 0.
    With grad enabled the masses carry the autograd graph, so losses can be trained through them. `reduce`,
    if given, is applied to each layer's mass as it is produced and only its result is kept (e.g. a per-sample
    mean over user tokens), so that the [B, H, L, 4] tensors need not all be alive at once.
    Yields a `MassRecord` (`.masses` for one forward, `.steps` for several).
    """
    state: Optional[_PatchState] = getattr(model, "_avar_state", None)
    if state is None:
        raise RuntimeError(
            f"collect_masses: {type(model).__name__} is not patched; call avar_ops.hf.apply(model) first"
        )
    if reduce is not None and not callable(reduce):
        raise TypeError(f"collect_masses: reduce must be callable or None, got {type(reduce).__name__}")
    collector = _Collector(reduce=reduce)
    state.collectors.append(collector)
    try:
        yield MassRecord(collector, state.num_layers)
    finally:
        state.collectors[:] = [c for c in state.collectors if c is not collector]


@contextlib.contextmanager
def patched(
    model,
    tokenizer,
    *,
    bias: Optional[TableLike] = None,
    logit_scale: Optional[TableLike] = None,
    layers: Optional[Iterable[int]] = None,
):
    """The model routed through avar for the duration of the block, then restored.

    A model the caller already patched is used as it is, with the tables it was patched with; passing tables
    for it is an error, since the two could disagree. Yields the live `PatchHandle` either way.
    """
    handle = get_handle(model)
    if handle is not None:
        if bias is not None or logit_scale is not None or layers is not None:
            raise RuntimeError(
                "avar patch: the model is already patched; revert it (avar_ops.hf.revert(model)) before passing "
                "tables, or use it as it is"
            )
        yield handle
        return
    handle = apply(model, tokenizer, bias=bias, logit_scale=logit_scale, layers=layers)
    try:
        yield handle
    finally:
        handle.revert()


@dataclass(frozen=True)
class LayerInputs:
    """What one layer's attention ran on: enough for `avar_ops.attention_key_mass` without recomputing q and k."""

    query: torch.Tensor  # [B, Lq, H, D] (rotary applied)
    key: torch.Tensor  # [B, Lk, H_kv, D] (rotary applied, cached positions included)
    lse: torch.Tensor  # float32 [B, H, Lq]
    key_group: torch.Tensor  # int8 [B, Lk]
    bias: Optional[torch.Tensor]  # float32 [H, 4] / [4], or None
    logit_scale: Optional[torch.Tensor]  # float32 [H, 4] / [4], or None
    scale: Optional[float]


@dataclass
class AttentionCapture:
    """Filled by `capture_attention`: the inputs of the chosen layers' attention in the first forward."""

    layers: List[int]
    inputs: dict = field(default_factory=dict)  # layer -> LayerInputs


@contextlib.contextmanager
def capture_attention(model, layers: Optional[Iterable[int]] = None):
    """Keep q, k, lse, groups and tables of the chosen layers (default all) from the forward run in the block.

    Each layer is captured once (the first forward that runs it); the tensors are detached. Per-key maps are
    then `avar_ops.attention_key_mass(c.query, c.key, c.lse, weights, c.key_group, c.bias, ...)`.
    """
    state: Optional[_PatchState] = getattr(model, "_avar_state", None)
    if state is None:
        raise RuntimeError(
            f"capture_attention: {type(model).__name__} is not patched; call avar_ops.hf.apply(model) first"
        )
    chosen = select_indices(layers, state.num_layers, "capture_attention: layers")
    capture = AttentionCapture(layers=chosen if chosen is not None else list(range(state.num_layers)))
    state.captures.append(capture)
    try:
        yield capture
    finally:
        state.captures[:] = [c for c in state.captures if c is not capture]
