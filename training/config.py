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
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import yaml

__all__ = [
    "ConfigError",
    "PATH_FIELDS",
    "Problem",
    "Problems",
    "load_config",
    "read_config",
    "key_lines",
    "parse_overrides",
    "require",
    "existing_file",
    "positive",
    "positive_float",
    "non_negative",
    "data_format",
    "MAX_SEED",
]

C = TypeVar("C")

# numpy's seed range, which transformers' and accelerate's set_seed hand every seed to.
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem found before a run: `where` is "FILE:LINE", "FILE" or "command line"; `kind` is "settings"
    (exit status 2) or "data" (exit status 1)."""

    where: str
    field: str
    reason: str
    kind: str = "settings"

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.reason}"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file or key, `problems` lists every problem found."""

    def __init__(self, message: Optional[str] = None, problems: Sequence[Problem] = ()):
        self.problems = list(problems)
        super().__init__(message if message is not None else "; ".join(str(p) for p in self.problems))


class Problems:
    """The (field, reason) pairs a config's `validate` finds; all of them are reported, not only the first."""

    def __init__(self):
        self.items: List[Tuple[str, str]] = []

    def add(self, field: str, reason: str) -> None:
        self.items.append((field, reason))

    def has(self, field: str) -> bool:
        return any(f == field for f, _ in self.items)

    def raise_any(self) -> None:
        if self.items:
            raise ConfigError(problems=[Problem("config", f, r) for f, r in self.items])


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


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require(p: Problems, value, name: str, what: str) -> None:
    if not value:
        p.add(name, f"required ({what})")


def existing_file(p: Problems, path: str, name: str) -> None:
    if path and not os.path.isfile(path):
        p.add(name, f"no such file {path!r}")


def positive(p: Problems, cfg, name: str) -> None:
    value = getattr(cfg, name)
    if not _finite(value) or value <= 0:
        p.add(name, f"must be > 0, got {value!r:.80}")


def positive_float(p: Problems, cfg, name: str) -> None:
    value = getattr(cfg, name)
    if not _finite(value) or value <= 0:
        p.add(name, f"must be a finite number > 0, got {value!r:.80}")


def non_negative(p: Problems, cfg, name: str) -> None:
    value = getattr(cfg, name)
    if not _finite(value) or value < 0:
        p.add(name, f"must be a finite number >= 0, got {value!r:.80}")


def data_format(p: Problems, value, name: str = "data_format") -> None:
    """The layout of the data files: avar, sharegpt, openai or auto (`avar_ops.data.formats`)."""
    from avar_ops.data import FORMATS

    if value not in FORMATS:
        p.add(name, f"must be one of {', '.join(FORMATS)}, got {value!r}")


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
            raise ConfigError(f"{name} must be a list, got {value!r:.80}")
        return [_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r:.80}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r:.80}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r:.80}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r:.80}")
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


def key_lines(text: str) -> Dict[str, int]:
    """The line of each top-level key of a YAML mapping (1-based)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def read_config(
    cls: Type[C], path: str, overrides: Optional[Dict[str, Any]] = None
) -> Tuple[Optional[C], List[Problem]]:
    """Read `cls` from the YAML mapping in `path` with `overrides` applied, collecting every problem.

    Returns (config, problems): the config is None when the file cannot be read as a mapping; otherwise it is
    built from the values that passed their type check (the defaults stand in for the others), and `problems`
    holds each one found, located at the key's line in the file ("FILE:LINE"), on the command line, or at the
    file alone for a key left at its default."""
    if not os.path.isfile(path):
        return None, [Problem(path, "config", "config file not found")]
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        raw = yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        return None, [Problem(path, "config", f"not UTF-8 text (byte at offset {exc.start})")]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        return None, [Problem(where, "config", "not valid YAML (" + " ".join(str(exc).split()) + ")")]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return None, [Problem(path, "config", "the config must be a YAML mapping of keys to values")]
    lines = key_lines(text)
    overrides = dict(overrides or {})

    def where(key: str) -> str:
        key = key.split("[")[0]
        if key in overrides:
            return "command line"
        return f"{path}:{lines[key]}" if key in lines else path

    base = os.path.dirname(os.path.abspath(path))
    values = {**raw, **overrides}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    problems = [
        Problem(where(str(key)), str(key), f"unknown key for {cls.__name__}")
        for key in sorted(set(values) - set(names), key=str)
    ]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            continue
        try:
            value = _coerce(key, value, hints[key])
        except ConfigError as exc:
            problems.append(Problem(where(key), key, str(exc).removeprefix(f"{key} ")))
            continue
        # A path given on the command line is relative to the working folder, one in the file to the file.
        if (
            key in PATH_FIELDS
            and isinstance(value, str)
            and value
            and value not in ("tiny", "latest")
            and not value.startswith("tiny:")  # the tiny model of a family, not a path
            and not os.path.isabs(value)
            and key not in overrides
        ):
            value = os.path.join(base, value)
        kwargs[key] = value
    cfg = cls(**kwargs)
    try:
        cfg.validate()
    except ConfigError as exc:
        typed = {p.field for p in problems}
        found = exc.problems or [Problem("config", "config", str(exc))]
        problems += [Problem(where(p.field), p.field, p.reason) for p in found if p.field.split("[")[0] not in typed]
    return cfg, problems


def load_config(cls: Type[C], path: str, overrides: Optional[Dict[str, Any]] = None) -> C:
    """Read `cls` from the YAML mapping in `path`, apply `overrides`, resolve paths, validate; ConfigError (with
    every problem in `problems`) when anything is wrong."""
    cfg, problems = read_config(cls, path, overrides)
    if problems:
        raise ConfigError(problems=problems)
    return cfg
