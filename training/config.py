"""Dataclass configs read from YAML: every key must be a field (an unknown key is an error that names it), every
value is checked against the field's type and the config's own rules, and `key=value` overrides from the command
line are parsed as YAML scalars. Paths inside a config file are relative to the file's folder.

The recipes themselves live with what they configure: `sft.config.SFTConfig`, `data.vard_config.VARDConfig`,
`grpo.config.GRPOConfig`; this module holds the loader and the value checks they share.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

import yaml

__all__ = [
    "ConfigError",
    "PATH_FIELDS",
    "load_config",
    "parse_overrides",
    "require",
    "existing_file",
    "positive",
    "positive_float",
    "non_negative",
    "data_format",
]

C = TypeVar("C")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file or key."""


# Fields holding paths that are resolved against the config file's folder.
PATH_FIELDS = (
    "model_name_or_path",
    "train_file",
    "eval_file",
    "output_dir",
    "deepspeed",
    "resume_from_checkpoint",
    "input_file",
    "templates_dir",
    "rejects_file",
)


def require(value, name: str, what: str) -> None:
    if not value:
        raise ConfigError(f"{name} is required ({what})")


def existing_file(path: str, name: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"{name}: no such file {path!r}")


def positive(cfg, name: str) -> None:
    if getattr(cfg, name) <= 0:
        raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")


def positive_float(cfg, name: str) -> None:
    value = getattr(cfg, name)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value}")


def non_negative(cfg, name: str) -> None:
    value = getattr(cfg, name)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value}")


def data_format(value, name: str = "data_format") -> None:
    """The layout of the data files: avar, sharegpt, openai or auto (`avar_ops.data.formats`)."""
    from avar_ops.data import FORMATS

    if value not in FORMATS:
        raise ConfigError(f"{name} must be one of {', '.join(FORMATS)}, got {value!r}")


def _coerce(name: str, value: Any, tp) -> Any:
    """value checked against the annotation tp (int, float, bool, str, Optional[...], List[...])."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported field type {tp}")


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """`key=value` strings -> {key: value}, each value parsed as a YAML scalar or list."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
    return out


def load_config(cls: Type[C], path: str, overrides: Optional[Dict[str, Any]] = None) -> C:
    """Read `cls` from the YAML mapping in `path`, apply `overrides`, resolve paths, validate."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping of keys to values")
    base = os.path.dirname(os.path.abspath(path))
    values = dict(raw)
    for key, value in (overrides or {}).items():
        values[key] = value
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown} for {cls.__name__}")
    kwargs = {}
    for key, value in values.items():
        value = _coerce(key, value, hints[key])
        # A path given on the command line is relative to the working folder, one in the file to the file.
        if (
            key in PATH_FIELDS
            and isinstance(value, str)
            and value
            and value not in ("tiny", "latest")
            and not os.path.isabs(value)
            and key in raw
            and key not in (overrides or {})
        ):
            value = os.path.join(base, value)
        kwargs[key] = value
    return cls(**kwargs).validate()
