"""`avar-train`: the training command line.

    avar-train sft   --config FILE [key=value ...]    cold-start SFT with AGTO (run under `accelerate launch` or
                                                     `torchrun` for several processes)
    avar-train steer --config FILE [key=value ...]    learned attention steering: the model frozen, only the bias /
                                                     logit-scale tables train (output_dir/steering.safetensors)
    avar-train vard  --config FILE [key=value ...]    VARD data synthesis
    avar-train grpo  --config FILE [key=value ...]    GRPO with the visual-anchored reward (VARS); same launchers
    avar-train check --config FILE [key=value ...]    everything `sft` / `steer` / `grpo` / `vard` check before a
                                                     model loads, and nothing else (`--command` names the trainer
                                                     when the recipe's keys do not tell)

Overrides are config keys with YAML values (`max_steps=10`, `agto_layers=[0,1]`). Every command first runs the
checks of `avar_train.preflight` (each setting, the machine, the model's config and processor, every record and
image, every prompt's length): each problem is one line on stderr, `WHERE: FIELD: REASON`, and the exit status is
2 when a setting is wrong, else 1 when the data is; no model weights have been loaded by then.

Output folders follow avar_ops.data's run-folder policy: a used output_dir is refused unless the command says
`resume=true` (continue that run, same settings only; `resume_from_checkpoint=latest` also resumes) or
`overwrite=true` (remove it and start again); one process writes a folder at a time (a lock file). A bad record
found while a batch is made stops the run with one line and exit status 1. Ctrl-C stops after the step in
progress with a checkpoint of it, one line and exit status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import List, Optional

from .config import ConfigError, Problem, parse_overrides, read_config
from .data.vard_config import VARDConfig
from .grpo.config import GRPOConfig
from .sft.config import SFTConfig
from .steer.config import SteerConfig

__all__ = ["main"]

RECIPES = {"sft": SFTConfig, "steer": SteerConfig, "grpo": GRPOConfig, "vard": VARDConfig}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _fail(message: str, code: int, command: str = "") -> int:
    prog = f"avar-train {command}".strip()
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    return code


# Settings a resumed run may change: where it logs and saves, how often, and how it reaches its generator.
_RESUMABLE = {
    # (Trainer takes logging_steps and save_steps from the checkpoint's state: a change would be ignored.)
    "sft": ("save_total_limit", "report_to", "dataloader_num_workers"),
    "steer": ("save_total_limit", "report_to", "dataloader_num_workers"),
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


def _abandoned(run, message: str, code: int, command: str = "") -> int:
    """A run that failed: its folder is handed back as new when it wrote nothing (see RunFolder.abandon)."""
    if run is not None:
        run.abandon()
    return _fail(message, code, command)


def _detect(path: str, overrides: dict) -> Optional[str]:
    """The trainer a recipe is for, from its keys: the one recipe that knows them all, or the narrowest of those
    that do when it extends into each other one (an SFT recipe also fits `steer`, which adds keys to SFT's);
    None when several unrelated recipes fit."""
    import dataclasses

    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return "sft"  # read_config reports what is wrong with the file
    keys = set(raw if isinstance(raw, dict) else ()) | set(overrides)
    unknown = {name: len(keys - {f.name for f in dataclasses.fields(cls)}) for name, cls in RECIPES.items()}
    fits = [name for name, n in unknown.items() if n == 0]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        return min(unknown, key=unknown.get)
    names = {name: {f.name for f in dataclasses.fields(RECIPES[name])} for name in fits}
    narrowest = min(fits, key=lambda name: len(names[name]))
    if all(names[narrowest] <= names[other] for other in fits):
        return narrowest
    return None


def preflight(command: str, config: str, overrides_text: List[str]):
    """(config or None, CheckResult) of `command` on the recipe `config` with the `key=value` overrides."""
    from . import preflight as checks

    try:
        overrides = parse_overrides(overrides_text)
    except ConfigError as exc:
        return None, checks.CheckResult(problems=[Problem("command line", "override", str(exc))])
    cfg, settings = read_config(RECIPES[command], config, overrides)
    if cfg is None:
        return None, checks.CheckResult(problems=settings)
    run = {"sft": checks.check_sft, "steer": checks.check_steer, "grpo": checks.check_grpo, "vard": checks.check_vard}[
        command
    ]
    return cfg, run(cfg, config, overrides, settings=settings)


def _report(command: str, result) -> None:
    for p in result.skipped:
        sys.stderr.write(f"avar-train {command}: skipped (skip_bad_records): {p}\n")
    for p in result.problems:
        sys.stderr.write(f"avar-train {command}: error: {' '.join(str(p).split())}\n")


def _start(command: str, args):
    """The checks, then the run folder (policy and lock) and the skipped records' rejects: (cfg, records, run) or
    (None, exit code, None)."""
    from avar_ops.data import append_rejects

    cfg, result = preflight(command, args.config, args.overrides)
    _report(command, result)
    if result.code:
        return None, result.code, None
    try:
        run = _open_output_dir(cfg, command)
    except ConfigError as exc:
        return None, _fail(str(exc), 2, command), None
    if result.rejects:
        append_rejects(os.path.join(cfg.output_dir, "rejects.jsonl"), result.rejects)
    return cfg, result.records, run


def _run_check(args) -> int:
    command = args.command_name
    if command is None:
        try:
            overrides = parse_overrides(args.overrides)
        except ConfigError as exc:
            return _fail(str(exc), 2, "check")
        command = _detect(args.config, overrides)
        if command is None:
            return _fail(
                f"{args.config}: its keys fit more than one trainer; say which with --command sft|steer|grpo|vard",
                2,
                "check",
            )
    cfg, result = preflight(command, args.config, args.overrides)
    _report(f"check ({command})", result)
    if not result.code:
        n = len(result.records or ())
        print(f"avar-train check: {command} recipe {args.config}: no problem found ({n} records usable)")
    return result.code


def _run_sft(args, command: str = "sft") -> int:
    from avar_ops.data import RecordError
    from avar_ops.hf import SteeringError

    from .data.collator import CollateError

    cfg, records, run = _start(command, args)
    if cfg is None:
        return records
    from .interrupt import Interrupted
    from .sft.trainer import LaunchError, train_sft
    from .steer.trainer import train_steer

    try:
        (train_steer if command == "steer" else train_sft)(cfg, records=records)
        if run is not None:
            run.finish()
    except (LaunchError, ConfigError) as exc:  # settings only the trainer can check (launch, checkpoints)
        return _abandoned(run, str(exc), 2, command)
    except (RecordError, CollateError, FileNotFoundError, SteeringError) as exc:
        return _abandoned(run, str(exc), 1, command)
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

    cfg, code, run = _start("vard", args)
    if cfg is None:
        return code
    from .data.vard import VARDError, run_vard

    try:
        summary = run_vard(cfg)
        if run is not None:
            run.finish()
    except (RecordError, VARDError, FileNotFoundError) as exc:
        return _abandoned(run, str(exc), 1, "vard")
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
    from .grpo.rewards import RewardError

    cfg, records, run = _start("grpo", args)
    if cfg is None:
        return records
    if cfg.eval_file is not None and not os.path.isfile(cfg.eval_file):
        if run is not None:
            run.abandon()
            run.release()
        return _fail(f"eval_file: no such file {cfg.eval_file!r}", 2, "grpo")
    from .grpo.trainer import train_grpo
    from .interrupt import Interrupted

    try:
        train_grpo(cfg, records=records)
        if run is not None:
            run.finish()
    except ConfigError as exc:  # settings only the trainer can check (the launcher's DeepSpeed)
        return _abandoned(run, str(exc), 2, "grpo")
    except (RecordError, CollateError, FileNotFoundError, RewardError) as exc:
        return _abandoned(run, str(exc), 1, "grpo")
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
    _add_command(
        sub,
        "steer",
        "learned attention steering: train only the per-(layer, head, group) bias and logit-scale tables",
        lambda args: _run_sft(args, "steer"),
    )
    _add_command(sub, "vard", "synthesise VARD data (describe, reason with reflection, anchor)", _run_vard)
    _add_command(sub, "grpo", "GRPO with the visual-anchored reward (r_acc + λ_v·r_visual + λ_f·r_format)", _run_grpo)
    p = sub.add_parser("check", help="check a recipe, its model and its data without training (exit 0, 1 or 2)")
    p.add_argument("--config", required=True, help="YAML recipe of sft, grpo or vard")
    p.add_argument(
        "--command", dest="command_name", choices=sorted(RECIPES), default=None, help="the trainer the recipe is for"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config keys to override")
    p.set_defaults(run=_run_check)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
