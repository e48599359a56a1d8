"""Steering files: learned per-(layer, head, group) bias β and logit scale γ tables of a patched model.

A steering file is a safetensors file with two float32 tensors and one JSON metadata entry:

    bias          [L, H, 4]   additive logit per attention layer, head and key group (0 = no change)
    logit_scale   [L, H, 4]   multiplies the scaled logit (1 = no change): s = scale·q·k·γ + β
    metadata      {"avar_steering": JSON}: format and version, model_type, num_layers (decoder layers),
                  attention_layers (the decoder index of each of the L rows), num_heads, groups (the column
                  names), trained (how the tables were made), commit (the avar checkout's, when known),
                  avar_version

The L rows are the model's softmax-attention layers in decoder order (every decoder layer except Qwen3.5's
linear-attention ones). A
file fits a model when model_type, num_layers, attention_layers and num_heads all agree; anything else is
refused in one line that names both shapes, so tables learned on one model never act on another's heads.

    steering = load_steering(path)                        # checks the file itself
    steering.check_fits(model_type=..., ...)              # and against a model
    handle.load_steering(path) / handle.clear_steering()  # on a patched model (avar_ops.hf.PatchHandle)
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from avar_ops.core import GROUP_NAMES, NUM_GROUPS

__all__ = [
    "STEERING_FORMAT",
    "STEERING_VERSION",
    "MAX_STEERING_VALUE",
    "Steering",
    "SteeringError",
    "load_steering",
    "save_steering",
    "model_steering_shape",
]

STEERING_FORMAT = "avar-steering"
STEERING_VERSION = 1
_META_KEY = "avar_steering"
# The same bound the intervention puts on its tables: a logit offset of 1e4 already moves all of a row's
# attention onto or off a group, and larger entries only risk overflowing float32 in the kernel.
MAX_STEERING_VALUE = 1e4


class SteeringError(ValueError):
    """A steering file that cannot be used (unreadable, malformed, or made for another model); one line."""


@dataclass(frozen=True)
class Steering:
    """The tables of one steering file and what they were made for."""

    bias: torch.Tensor  # float32 [L, H, 4]
    logit_scale: torch.Tensor  # float32 [L, H, 4]
    model_type: str
    num_layers: int  # decoder layers of the model
    attention_layers: tuple  # decoder index of each of the L rows
    num_heads: int
    trained: dict = field(default_factory=dict)
    commit: Optional[str] = None
    avar_version: str = ""
    path: Optional[str] = None

    def shape_text(self) -> str:
        return _shape_text(self.model_type, self.num_layers, self.attention_layers, self.num_heads)

    def check_fits(self, *, model_type: str, num_layers: int, num_heads: int, attention_layers=None) -> None:
        """SteeringError (one line naming both) unless the file was made for a model of this shape."""
        layers = tuple(range(num_layers)) if attention_layers is None else tuple(int(i) for i in attention_layers)
        ours = (self.model_type, self.num_layers, self.attention_layers, self.num_heads)
        if ours != (model_type, int(num_layers), layers, int(num_heads)):
            where = f"steering file {self.path}" if self.path else "steering tables"
            raise SteeringError(
                f"{where} was made for {self.shape_text()}, but this model is "
                f"{_shape_text(model_type, num_layers, layers, num_heads)}"
            )

    def layer_tables(self):
        """(bias, logit_scale) float32 [L, H, 4], one row per softmax-attention layer: the tables
        `avar_ops.hf.apply` / `PatchHandle.set_bias` take (copies)."""
        return self.bias.clone(), self.logit_scale.clone()

    def describe(self) -> str:
        name = os.path.basename(self.path) if self.path else "tables"
        return f"steering {name} ({len(self.attention_layers)} layers × {self.num_heads} heads)"

    def to_dict(self) -> dict:
        """What reports record about the steering a model ran with (no tensors)."""
        return {"steering": self.path, **self.metadata()}

    def metadata(self) -> dict:
        return {
            "format": STEERING_FORMAT,
            "version": STEERING_VERSION,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "attention_layers": list(self.attention_layers),
            "num_heads": self.num_heads,
            "groups": list(GROUP_NAMES),
            "trained": self.trained,
            "commit": self.commit,
            "avar_version": self.avar_version,
        }


def _shape_text(model_type, num_layers, attention_layers, num_heads) -> str:
    layers = tuple(attention_layers)
    which = "" if layers == tuple(range(num_layers)) else f" (attention layers {list(layers)})"
    return f"{model_type} with {num_layers} layers{which} × {num_heads} heads"


def model_steering_shape(model, attention_layers: Optional[Sequence[int]] = None) -> dict:
    """model_type, num_layers (decoder layers), num_heads and attention_layers (decoder indices of the
    softmax-attention layers) of a model of a supported family, or of its config."""
    from avar_ops.hf.families import attention_layer_indices

    cfg = getattr(model, "config", model)
    text = getattr(cfg, "text_config", None) or cfg
    num_layers = int(text.num_hidden_layers)
    layers = attention_layer_indices(cfg) if attention_layers is None else [int(i) for i in attention_layers]
    return {
        "model_type": str(getattr(cfg, "model_type", "")),
        "num_layers": num_layers,
        "num_heads": int(text.num_attention_heads),
        "attention_layers": layers,
    }


def _avar_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("avar")
    except PackageNotFoundError:
        return "0+unknown"


def _commit() -> Optional[str]:
    """The commit of the avar checkout this module runs from, when it is a git checkout (else None)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def _check_table(name: str, table, rows: int, heads: int, where: str) -> torch.Tensor:
    if not isinstance(table, torch.Tensor):
        raise SteeringError(f"{where}: {name} must be a tensor, got {type(table).__name__}")
    if tuple(table.shape) != (rows, heads, NUM_GROUPS):
        raise SteeringError(
            f"{where}: {name} must be [{rows}, {heads}, {NUM_GROUPS}] (attention layers, heads, groups), "
            f"got {list(table.shape)}"
        )
    if not table.dtype.is_floating_point:
        raise SteeringError(f"{where}: {name} must be floating point, got {table.dtype}")
    table = table.detach().to(device="cpu", dtype=torch.float32)
    bad = ~torch.isfinite(table) | (table.abs() > MAX_STEERING_VALUE)
    if bool(bad.any()):
        index = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise SteeringError(
            f"{where}: {name}{list(index)} = {float(table[index]):g}; entries must be finite and at most "
            f"{MAX_STEERING_VALUE:g} in size"
        )
    return table.contiguous()


def save_steering(
    path: str,
    bias: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    model_type: str,
    num_layers: int,
    num_heads: int,
    attention_layers: Optional[Sequence[int]] = None,
    trained: Optional[dict] = None,
) -> Steering:
    """Write a steering file (bias and logit_scale [L, H, 4], L = len(attention_layers)) and return what it holds.

    The file is written next to `path` first and renamed into place, so a save cut short never leaves a
    truncated steering file under the final name.
    """
    from safetensors.torch import save_file

    layers = tuple(range(num_layers)) if attention_layers is None else tuple(int(i) for i in attention_layers)
    steering = Steering(
        bias=_check_table("bias", bias, len(layers), num_heads, "save_steering"),
        logit_scale=_check_table("logit_scale", logit_scale, len(layers), num_heads, "save_steering"),
        model_type=str(model_type),
        num_layers=int(num_layers),
        attention_layers=layers,
        num_heads=int(num_heads),
        trained=dict(trained or {}),
        commit=_commit(),
        avar_version=_avar_version(),
        path=path,
    )
    meta = json.dumps(steering.metadata(), sort_keys=True, allow_nan=False, default=str)
    partial = f"{path}.partial"
    save_file({"bias": steering.bias, "logit_scale": steering.logit_scale}, partial, metadata={_META_KEY: meta})
    os.replace(partial, path)
    return steering


def _int(meta: dict, key: str, where: str) -> int:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SteeringError(f"{where}: metadata {key} must be a positive integer, got {value!r:.60}")
    return value


def load_steering(path: str) -> Steering:
    """Read and check a steering file (SteeringError, one line, when it is not one or is malformed)."""
    from safetensors import SafetensorError, safe_open

    where = f"steering file {path}"
    if not isinstance(path, (str, os.PathLike)):
        raise SteeringError(f"steering file: expected a path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SteeringError(f"{where}: no such file")
    if not os.path.isfile(path):
        raise SteeringError(f"{where}: is a folder; expected a .safetensors steering file")
    try:
        with safe_open(path, framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(_META_KEY)
            names = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in ("bias", "logit_scale") if k in names}
    except (SafetensorError, OSError, ValueError) as exc:
        raise SteeringError(f"{where}: not a readable safetensors file ({' '.join(str(exc).split())[:120]})") from None
    if raw_meta is None:
        raise SteeringError(f"{where}: no '{_META_KEY}' metadata; not a steering file (see save_steering)")
    try:
        meta = json.loads(raw_meta)
    except ValueError:
        raise SteeringError(f"{where}: its '{_META_KEY}' metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != STEERING_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise SteeringError(f"{where}: metadata format must be {STEERING_FORMAT!r}, got {got!r:.60}")
    if meta.get("version") != STEERING_VERSION:
        raise SteeringError(
            f"{where}: steering format version {meta.get('version')!r:.20}; this avar reads version {STEERING_VERSION}"
        )
    if list(meta.get("groups") or []) != list(GROUP_NAMES):
        raise SteeringError(f"{where}: groups must be {list(GROUP_NAMES)}, got {meta.get('groups')!r:.80}")
    model_type = meta.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise SteeringError(f"{where}: metadata model_type must be a non-empty string, got {model_type!r:.60}")
    num_layers, num_heads = _int(meta, "num_layers", where), _int(meta, "num_heads", where)
    layers = meta.get("attention_layers")
    if (
        not isinstance(layers, list)
        or not layers
        or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)
        or layers != sorted(set(layers))
        or layers[0] < 0
        or layers[-1] >= num_layers
    ):
        raise SteeringError(
            f"{where}: metadata attention_layers must be increasing decoder indices in [0, {num_layers}), "
            f"got {layers!r:.80}"
        )
    missing = [k for k in ("bias", "logit_scale") if k not in tensors]
    if missing:
        raise SteeringError(f"{where}: lacks the tensor(s) {missing}")
    trained = meta.get("trained") if isinstance(meta.get("trained"), dict) else {}
    return Steering(
        bias=_check_table("bias", tensors["bias"], len(layers), num_heads, where),
        logit_scale=_check_table("logit_scale", tensors["logit_scale"], len(layers), num_heads, where),
        model_type=model_type,
        num_layers=num_layers,
        attention_layers=tuple(layers),
        num_heads=num_heads,
        trained=trained,
        commit=meta.get("commit") if isinstance(meta.get("commit"), str) else None,
        avar_version=str(meta.get("avar_version", "")),
        path=path,
    )
