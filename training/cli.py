"""`avar-train`: the training command line.

    avar-train sft  --config FILE [key=value ...]     cold-start SFT with AGTO (run under `accelerate launch` or
                                                     `torchrun` for several processes)
    avar-train vard --config FILE [key=value ...]     VARD data synthesis
    avar-train grpo --config FILE [key=value ...]     GRPO with the visual-anchored reward (VARS); same launchers

Overrides are config keys with YAML values (`max_steps=10`, `agto_layers=[0,1]`). Arguments, the config and the
output folder are checked before any model is loaded; a problem with them is one line on stderr and exit
status 2, a problem with the data (a bad record, also one found while a batch is made) one line and exit status 1.

Output folders follow avar_ops.data's run-folder policy: a used output_dir is refused unless the command says
`resume=true` (continue that run, same settings only; `resume_from_checkpoint=latest` also resumes) or
`overwrite=true` (remove it and start again); one process writes a folder at a time (a lock file). Ctrl-C stops
after the step in progress with a checkpoint of it, one line and exit status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
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


# Settings a resumed run may change: where it logs and saves, how often, and how it reaches its generator.
_RESUMABLE = {
    # (Trainer takes logging_steps and save_steps from the checkpoint's state: a change would be ignored.)
    "sft": ("save_total_limit", "report_to", "dataloader_num_workers"),
    "grpo": ("logging_steps", "save_steps", "report_to"),
    "vard": ("base_url", "api_key_env", "timeout", "max_retries", "retry_backoff", "concurrency", "limit"),
}
_NOT_SETTINGS = ("output_dir", "resume", "overwrite", "resume_from_checkpoint")
_RESUME_HINT = "rerun the same command with resume=true to resume"


def _open_output_dir(cfg, command: str):
    """The run-folder policy (avar_ops.data.open_run_folder) for output_dir: refuses a used folder unless told
    resume=true / overwrite=true, refuses to resume other settings, takes the lock. Only the first process of a
    multi-process run applies it (the others write nothing of their own there); they get None."""
    from avar_ops.data import RunFolderError, open_run_folder

    if int(os.environ.get("RANK", "0")) != 0:
        return None
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_SETTINGS}
    resume = bool(cfg.resume or getattr(cfg, "resume_from_checkpoint", None))
    try:
        return open_run_folder(
            cfg.output_dir,
            f"avar-train {command}",
            settings,
            resume=resume,
            overwrite=cfg.overwrite,
            resumable=_RESUMABLE[command],
            what="output_dir",
            flags=("resume=true", "overwrite=true"),
        )
    except RunFolderError as exc:
        raise ConfigError(str(exc)) from None


def _stopped(message: str) -> int:
    sys.stderr.write(f"avar-train: {message}\n")
    return 130


def _abandoned(run, message: str, code: int) -> int:
    """A run that failed: its folder is handed back as new when it wrote nothing (see RunFolder.abandon)."""
    if run is not None:
        run.abandon()
    return _fail(message, code)


def _run_sft(args) -> int:
    from avar_ops.data import RecordError

    from .data.collator import CollateError

    try:
        cfg = load_config(SFTConfig, args.config, parse_overrides(args.overrides))
        run = _open_output_dir(cfg, "sft")
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from .interrupt import Interrupted
    from .sft.trainer import LaunchError, train_sft

    try:
        train_sft(cfg)
        if run is not None:
            run.finish()
    except LaunchError as exc:
        return _abandoned(run, str(exc), 2)
    except (RecordError, CollateError, FileNotFoundError) as exc:
        return _abandoned(run, str(exc), 1)
    except Interrupted as exc:
        return _stopped(f"interrupted at step {exc.step}; {_RESUME_HINT}")
    except KeyboardInterrupt:
        return _stopped(f"interrupted during a step; {_RESUME_HINT} from its newest checkpoint")
    finally:
        if run is not None:
            run.release()
    return 0


def _run_vard(args) -> int:
    from avar_ops.data import RecordError

    try:
        cfg = load_config(VARDConfig, args.config, parse_overrides(args.overrides))
        run = _open_output_dir(cfg, "vard")
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from .data.vard import VARDError, run_vard

    try:
        summary = run_vard(cfg)
        if run is not None:
            run.finish()
    except (RecordError, VARDError, FileNotFoundError) as exc:
        return _abandoned(run, str(exc), 1)
    except KeyboardInterrupt:
        return _stopped(f"interrupted; finished records are in {cfg.output_dir}; {_RESUME_HINT}")
    finally:
        if run is not None:
            run.release()
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
        if cfg.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(cfg.resume_from_checkpoint):
            raise ConfigError(f"resume_from_checkpoint: no such folder {cfg.resume_from_checkpoint!r}")
        run = _open_output_dir(cfg, "grpo")
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from .grpo.trainer import train_grpo
    from .interrupt import Interrupted

    try:
        train_grpo(cfg)
        if run is not None:
            run.finish()
    except (RecordError, CollateError, FileNotFoundError) as exc:
        return _abandoned(run, str(exc), 1)
    except Interrupted as exc:
        return _stopped(f"interrupted at step {exc.step}; {_RESUME_HINT}")
    except KeyboardInterrupt:
        return _stopped(f"interrupted during a step; {_RESUME_HINT} from its newest checkpoint")
    finally:
        if run is not None:
            run.release()
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
