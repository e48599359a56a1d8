"""Dataclass configs read from YAML: every key must be a field (an unknown key is an error that names it), every
value is checked against the field's type and the config's own rules, and `key=value` overrides from the command
line are parsed as YAML scalars. Paths inside a config file are relative to the file's folder.

`SFTConfig` and `VARDConfig` are the recipes of `avar-train sft` and `avar-train vard`; names shared with
`transformers.TrainingArguments` mean the same thing there.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

import yaml

__all__ = ["ConfigError", "SFTConfig", "VARDConfig", "load_config", "parse_overrides", "PATH_FIELDS"]

C = TypeVar("C")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file or key."""


# Fields holding paths that are resolved against the config file's folder.
PATH_FIELDS = (
    "model_name_or_path",
    "train_file",
    "output_dir",
    "deepspeed",
    "resume_from_checkpoint",
    "input_file",
    "templates_dir",
    "rejects_file",
)


@dataclass
class SFTConfig:
    # model and data
    model_name_or_path: str = "tiny"  # a local Qwen2.5-VL checkpoint folder, or "tiny" (the embedded random model)
    train_file: str = ""  # JSONL records with a target (see avar_train.records)
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
        _require(self.train_file, "train_file", "the JSONL file of SFT records")
        _require(self.output_dir, "output_dir", "the folder checkpoints and logs go to")
        for name in (
            "max_length",
            "min_pixels",
            "max_pixels",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            _positive(self, name)
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        for name in ("alpha", "beta", "weight_decay", "warmup_ratio", "max_grad_norm"):
            _non_negative(self, name)
        _positive_float(self, "agto_eps")
        _positive_float(self, "learning_rate")
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
        if self.agto_layers is not None and (not self.agto_layers or any(i < 0 for i in self.agto_layers)):
            raise ConfigError(
                f"agto_layers must be null (all layers) or a non-empty list of layer indices >= 0, "
                f"got {self.agto_layers}"
            )
        if self.use_cpu and self.deepspeed:
            raise ConfigError("use_cpu disables DeepSpeed; leave it false with a deepspeed config")
        if self.ddp_backend not in (None, "gloo", "nccl", "mpi", "ccl", "hccl", "cncl", "mccl"):
            raise ConfigError(f"ddp_backend must be null or a torch.distributed backend, got {self.ddp_backend!r}")
        _existing_file(self.train_file, "train_file")
        if self.deepspeed is not None:
            _existing_file(self.deepspeed, "deepspeed")
        if self.model_name_or_path != "tiny" and not os.path.isdir(self.model_name_or_path):
            raise ConfigError(
                f"model_name_or_path must be 'tiny' or a local checkpoint folder, got {self.model_name_or_path!r} "
                "(no such folder; nothing is downloaded)"
            )
        return self


@dataclass
class VARDConfig:
    input_file: str = ""  # JSONL records with question (+ answer) and image(s)
    output_dir: str = ""  # gets vard.jsonl (kept), rejects.jsonl, summary.json
    templates_dir: Optional[str] = None  # folder with describe.txt, reason.txt, anchor.txt (default: shipped)
    generator: str = "http"  # http | hf | "module:function" (a callable (messages, images) -> str)
    base_url: Optional[str] = None  # http: the OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1
    model: Optional[str] = None  # http: the served model name; hf: a local checkpoint folder or "tiny"
    api_key_env: Optional[str] = None  # http: name of the environment variable holding the API key
    timeout: float = 120.0
    max_retries: int = 3
    retry_backoff: float = 1.0  # seconds before the first retry, doubling after each
    concurrency: int = 8
    temperature: float = 0.7
    max_new_tokens: int = 2048
    min_anchors: int = 1
    anchor_phrases: List[str] = field(
        default_factory=lambda: [
            "look back at",
            "looking back at",
            "look at the image",
            "looking at the image",
            "in the image",
            "the image shows",
            "check the image",
            "from the image",
            "in the figure",
            "the figure shows",
        ]
    )
    answer_check: bool = True  # keep an output only if its answer agrees with the record's reference
    skip_bad_records: bool = False
    limit: Optional[int] = None

    def validate(self) -> "VARDConfig":
        _require(self.input_file, "input_file", "the JSONL file of question records")
        _require(self.output_dir, "output_dir", "the folder the synthesised data goes to")
        _existing_file(self.input_file, "input_file")
        if self.templates_dir is not None and not os.path.isdir(self.templates_dir):
            raise ConfigError(f"templates_dir: no such folder {self.templates_dir!r}")
        if self.generator == "http":
            if not self.base_url or not self.base_url.startswith(("http://", "https://")):
                raise ConfigError(f"base_url must be an http(s) URL for generator 'http', got {self.base_url!r}")
            if not self.model:
                raise ConfigError("model (the served model's name) is required for generator 'http'")
        elif self.generator == "hf":
            if not self.model:
                raise ConfigError("model (a local checkpoint folder or 'tiny') is required for generator 'hf'")
        elif ":" not in self.generator:
            raise ConfigError(f"generator must be 'http', 'hf' or 'module:function', got {self.generator!r}")
        for name in ("max_retries", "min_anchors"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("concurrency", "max_new_tokens"):
            _positive(self, name)
        _positive_float(self, "timeout")
        _non_negative(self, "retry_backoff")
        _non_negative(self, "temperature")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"limit must be a positive int or null, got {self.limit}")
        if self.min_anchors and not self.anchor_phrases:
            raise ConfigError("anchor_phrases must not be empty when min_anchors > 0")
        return self


def _require(value, name: str, what: str) -> None:
    if not value:
        raise ConfigError(f"{name} is required ({what})")


def _existing_file(path: str, name: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"{name}: no such file {path!r}")


def _positive(cfg, name: str) -> None:
    if getattr(cfg, name) <= 0:
        raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")


def _positive_float(cfg, name: str) -> None:
    value = getattr(cfg, name)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value}")


def _non_negative(cfg, name: str) -> None:
    value = getattr(cfg, name)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value}")


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
