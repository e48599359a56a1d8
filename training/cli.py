"""`avar-train`: the training command line.

    avar-train sft  --config FILE [key=value ...]     cold-start SFT with AGTO (run under `accelerate launch` or
                                                     `torchrun` for several processes)
    avar-train vard --config FILE [key=value ...]     VARD data synthesis
    avar-train grpo --config FILE [key=value ...]     GRPO with the visual-anchored reward (VARS); same launchers

Overrides are config keys with YAML values (`max_steps=10`, `agto_layers=[0,1]`). Arguments, the config and the
output folder are checked before any model is loaded; a problem with them is one line on stderr and exit
status 2, a problem with the data one line and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .config import ConfigError, load_config, parse_overrides
from .data.vard_config import VARDConfig
from .sft.config import SFTConfig

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"avar-train: error: {message}\n")
    return code


def _prepare_output_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output_dir {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output_dir {path!r} cannot be created ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"output_dir {path!r} is not writable")


def _run_sft(args) -> int:
    from avar_ops.data import RecordError

    from .data.collator import CollateError

    try:
        cfg = load_config(SFTConfig, args.config, parse_overrides(args.overrides))
        _prepare_output_dir(cfg.output_dir)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from .sft.trainer import LaunchError, train_sft

    try:
        train_sft(cfg)
    except (LaunchError, ConfigError) as exc:  # settings only the trainer can check (launch, checkpoints)
        return _fail(str(exc), 2)
    except (RecordError, CollateError, FileNotFoundError) as exc:
        return _fail(str(exc), 1)
    return 0


def _run_vard(args) -> int:
    from avar_ops.data import RecordError

    try:
        cfg = load_config(VARDConfig, args.config, parse_overrides(args.overrides))
        _prepare_output_dir(cfg.output_dir)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from .data.vard import VARDError, run_vard

    try:
        summary = run_vard(cfg)
    except (RecordError, VARDError, FileNotFoundError) as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail(f"interrupted; finished records are in {cfg.output_dir}, run again to resume", 130)
    print(summary.line())
    return 0


def _run_grpo(args) -> int:
    from avar_ops.data import RecordError

    from .data.collator import CollateError
    from .grpo.config import load_grpo_config

    try:
        cfg = load_grpo_config(args.config, parse_overrides(args.overrides))
        if not os.path.isfile(cfg.train_file):
            raise ConfigError(f"train_file: no such file {cfg.train_file!r}")
        if cfg.eval_file is not None and not os.path.isfile(cfg.eval_file):
            raise ConfigError(f"eval_file: no such file {cfg.eval_file!r}")
        if cfg.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(cfg.resume_from_checkpoint):
            raise ConfigError(f"resume_from_checkpoint: no such folder {cfg.resume_from_checkpoint!r}")
        _prepare_output_dir(cfg.output_dir)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from .grpo.trainer import train_grpo

    try:
        train_grpo(cfg)
    except (RecordError, CollateError, FileNotFoundError) as exc:
        return _fail(str(exc), 1)
    return 0


def _add_command(sub, name: str, help_text: str, run) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", required=True, help="YAML recipe (see training/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config keys to override")
    p.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="avar-train", description="Attention-guided training of Qwen2.5-VL on avar.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_command(sub, "sft", "cold-start SFT with the AGTO attention losses", _run_sft)
    _add_command(sub, "vard", "synthesise VARD data (describe, reason with reflection, anchor)", _run_vard)
    _add_command(sub, "grpo", "GRPO with the visual-anchored reward (r_acc + λ_v·r_visual + λ_f·r_format)", _run_grpo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
