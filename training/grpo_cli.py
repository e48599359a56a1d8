"""`avar-train grpo --config FILE [key=value ...]`: the recipe, the data file and the output folder are checked
before any model is loaded; a bad one is one line on stderr and exit status 2, bad data one line and status 1."""

from __future__ import annotations

import os

__all__ = ["run_grpo"]


def run_grpo(args) -> int:
    from avar_train.cli import _fail, _prepare_output_dir
    from avar_train.collator import CollateError
    from avar_train.config import ConfigError, parse_overrides
    from avar_train.grpo_config import load_grpo_config
    from avar_train.records import RecordError

    try:
        cfg = load_grpo_config(args.config, parse_overrides(args.overrides))
        if not os.path.isfile(cfg.train_file):
            raise ConfigError(f"train_file: no such file {cfg.train_file!r}")
        if cfg.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(cfg.resume_from_checkpoint):
            raise ConfigError(f"resume_from_checkpoint: no such folder {cfg.resume_from_checkpoint!r}")
        _prepare_output_dir(cfg.output_dir)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from avar_train.grpo import train_grpo

    try:
        train_grpo(cfg)
    except (RecordError, CollateError, FileNotFoundError) as exc:
        return _fail(str(exc), 1)
    return 0
