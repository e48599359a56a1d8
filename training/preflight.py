"""Everything a run depends on, checked before any model weights load: `avar-train check` and the start of every
`avar-train` command.

What is checked, besides each value of the recipe (its `validate`):

- the machine and the launcher: bf16 without a GPU, trackers in `report_to` that are not installed, DeepSpeed
  without the `deepspeed` package or without a launcher's environment, an `accelerate` DeepSpeed config file
  given relative to a folder the run was not started in;
- the model: a checkpoint folder without config or weights, layer indices (`agto_layers`, `visual_layers`) against
  its layer count with the rule −n ≤ i < n; its processor and config are read, never its weights;
- the code a recipe names: every `reward_funcs` entry and the `accuracy_checker` are imported;
- the data: every record and image is opened, every record rendered by the chat template and measured with the
  processor's tokenizer (image tokens from the image sizes) against `max_length` (an image is never cut, a target
  must survive), `max_prompt_length` and the model's context length; SFT records must have the token groups the
  AGTO terms read (or `agto_empty: skip`); a GRPO step must not ask for more prompts than the data holds.

Every problem is one line `WHERE: FIELD: REASON` (WHERE is FILE:LINE of the recipe or the data, or "command
line" for an override). Exit status 2 when a setting is wrong, else 1 when the data is. With
`skip_bad_records: true` a bad record is skipped (with its reason in the run's rejects.jsonl) instead.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .config import Problem, key_lines

__all__ = ["CheckResult", "check_sft", "check_steer", "check_grpo", "check_vard", "TRACKERS", "LAUNCHER_ENV"]

# The trackers transformers / accelerate can report to, and the module each one needs.
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "neptune": ("neptune",),
    "aim": ("aim",),
    "azure_ml": ("azureml",),
    "codecarbon": ("codecarbon",),
    "swanlab": ("swanlab",),
    "trackio": ("trackio",),
}
# What torch.distributed and DeepSpeed read to join a process group; set by accelerate launch, torchrun and
# deepspeed. Without them DeepSpeed falls back to MPI discovery.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_WEIGHTS = (".safetensors", ".bin", ".pt")


@dataclass
class CheckResult:
    problems: List[Problem] = field(default_factory=list)  # what stops the run
    skipped: List[Problem] = field(default_factory=list)  # bad records `skip_bad_records` leaves out
    records: Optional[list] = None  # the good records, in file order, when the data was read
    rejects: List[dict] = field(default_factory=list)  # rejects.jsonl rows of the skipped records

    @property
    def code(self) -> int:
        if any(p.kind == "settings" for p in self.problems):
            return 2
        return 1 if self.problems else 0


class _Where:
    """Where a config key is written: FILE:LINE in the recipe, "command line", or the recipe file."""

    def __init__(self, path: Optional[str], overrides: Optional[dict]):
        self.path = path or "config"
        self.overrides = set(overrides or ())
        self.lines: Dict[str, int] = {}
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                self.lines = key_lines(f.read().decode("utf-8", errors="replace"))

    def __call__(self, key: str) -> str:
        if key in self.overrides:
            return "command line"
        return f"{self.path}:{self.lines[key]}" if key in self.lines else self.path

    def problem(self, key: str, reason: str) -> Problem:
        return Problem(self(key), key, reason, "settings")


# ------------------------------------------------------------------------------------------- machine, launcher


def _trackers(where: _Where, report_to) -> List[Problem]:
    out = []
    for name in report_to or ():
        if name in ("none", "all"):
            continue
        if name not in TRACKERS:
            out.append(where.problem("report_to", f"unknown tracker {name!r} (known: {', '.join(sorted(TRACKERS))})"))
        elif not any(importlib.util.find_spec(m) is not None for m in TRACKERS[name]):
            out.append(
                where.problem("report_to", f"the tracker {name!r} is not installed (pip install {TRACKERS[name][0]})")
            )
    return out


def _deepspeed(where: _Where, path: Optional[str]) -> List[Problem]:
    """A DeepSpeed run: the recipe's `deepspeed` file (SFT) or the one `accelerate launch` passes on."""
    out = []
    env_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    by_accelerate = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if not path and not by_accelerate:
        return out
    if importlib.util.find_spec("deepspeed") is None:
        return [where.problem("deepspeed", "DeepSpeed is not installed (pip install deepspeed)")]
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                if not isinstance(json.load(f), dict):
                    raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            out.append(where.problem("deepspeed", f"{path!r} is not a readable DeepSpeed JSON config ({exc})"))
    if by_accelerate and env_file and env_file != "none" and not os.path.isfile(env_file):
        out.append(
            Problem(
                "accelerate config",
                "deepspeed_config_file",
                f"{env_file!r} is not a file as seen from the working folder {os.getcwd()} (a relative path in an "
                "accelerate config is read from the folder the run starts in); launch from the folder it is "
                "relative to, or write it as an absolute path",
            )
        )
    missing = [k for k in LAUNCHER_ENV if k not in os.environ]
    if path and missing:
        out.append(
            where.problem(
                "deepspeed",
                f"a DeepSpeed run is started by a launcher (accelerate launch, torchrun or deepspeed), which sets "
                f"{', '.join(LAUNCHER_ENV)}; {', '.join(missing)} not set here",
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------- model


@dataclass
class _Model:
    processor: object
    num_layers: int
    context: int  # max_position_embeddings of the text model
    num_heads: int = 0  # query heads of the text model (0: not read)


@functools.lru_cache(maxsize=4)
def _tiny_processor(family: str):
    from avar_ops.analysis import build_tiny

    return build_tiny(family, seed=0)[1]


@functools.lru_cache(maxsize=4)
def _local_processor(path: str, min_pixels: Optional[int], max_pixels: Optional[int]):
    from transformers import AutoProcessor

    kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    return AutoProcessor.from_pretrained(path, local_files_only=True, **kwargs)


def _model(where: _Where, name: str, min_pixels=None, max_pixels=None) -> Tuple[Optional[_Model], List[Problem]]:
    """The model's processor, layer count and context length, read without its weights."""
    from avar_ops.analysis import ModelSpecError, model_shape, tiny_family

    key = "model_name_or_path"
    try:
        family = tiny_family(name)
    except ModelSpecError as exc:
        return None, [where.problem(key, str(exc))]
    if family is not None:
        shape = model_shape(name)
        return _Model(_tiny_processor(family), shape.num_layers, shape.context, shape.num_heads), []
    if not os.path.isdir(name):
        return None, [
            where.problem(key, f"no such folder {name!r} (a local checkpoint folder, 'tiny' or 'tiny:FAMILY')")
        ]
    config_path = os.path.join(name, "config.json")
    if not os.path.isfile(config_path):
        return None, [where.problem(key, f"{name!r} has no config.json; it is not a Hugging Face checkpoint folder")]
    files = os.listdir(name)
    if not any(f.endswith(_WEIGHTS) for f in files):
        return None, [where.problem(key, f"{name!r} holds no weights (no *.safetensors or *.bin file)")]
    try:
        shape = model_shape(name, key)
    except ModelSpecError as exc:
        return None, [where.problem(key, str(exc).removeprefix(f"{key}: "))]
    if shape.context is None:
        return None, [where.problem(key, f"{config_path} has no positive num_hidden_layers / max_position_embeddings")]
    try:
        processor = _local_processor(os.path.abspath(name), min_pixels, max_pixels)
    except (OSError, ValueError, TypeError) as exc:
        return None, [where.problem(key, f"cannot read the processor of {name!r} ({' '.join(str(exc).split())})")]
    return _Model(processor, shape.num_layers, shape.context, shape.num_heads), []


# What a record lacking a group needs, for the AGTO terms to measure it.
_GIVE = {"image": "an image", "system": "a system prompt (this chat template adds none)", "user": "a question"}


def _layers(where: _Where, key: str, value, count: int) -> List[Problem]:
    from avar_ops.core import select_indices

    try:
        select_indices(value, count, key)
    except (TypeError, ValueError) as exc:
        return [where.problem(key, str(exc).removeprefix(f"{key}: ") + f" (the model has {count} layers)")]
    return []


# ------------------------------------------------------------------------------------------------------ data


def _records(result: CheckResult, path: str, use: str, skip: bool, limit: Optional[int] = None, format: str = "avar"):
    """Read every record (the first `limit`); the bad ones become problems, or (skip) skipped problems with their
    rejects rows."""
    from avar_ops.data import load_records

    loaded = load_records(path, use=use, on_error="report", limit=limit, format=format)
    problems = [Problem(f"{r['file']}:{r['line']}", "record", r["reason"], "data") for r in loaded.rejects]
    if skip:
        result.skipped += problems
        result.rejects += loaded.rejects
    else:
        result.problems += problems
    result.records = loaded.records
    return loaded


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _measure_all(loaded, data_file: str, collator, judge) -> Tuple[list, List[Tuple[int, Problem, object]]]:
    """Measure every record; `judge(record, measure)` gives (field, reason) problems. Returns the good records and
    (line, problem, record) of the bad ones."""
    from .data.collator import CollateError

    good, bad = [], []
    for record, line in zip(loaded.records, loaded.lines):
        where = f"{data_file}:{line}"
        try:
            found = judge(record, collator.measure(record))
        except (CollateError, ValueError, OSError) as exc:
            found = [("record", _one_line(exc))]
        if found:
            bad.extend((line, Problem(where, f, r, "data"), record) for f, r in found)
        else:
            good.append(record)
    return good, bad


def _finish(result: CheckResult, good, bad, skip: bool, data_file: str) -> None:
    """Record the measured records' verdicts: problems, or (skip_bad_records) skipped with a rejects row each."""
    if skip:
        result.skipped += [p for _, p, _ in bad]
        seen = set()
        for line, p, record in bad:
            if line not in seen:
                seen.add(line)
                result.rejects.append(
                    {"file": data_file, "line": line, "reason": f"{p.field}: {p.reason}", "id": record.id}
                )
    else:
        result.problems += [p for _, p, _ in bad]
    result.records = good


# ------------------------------------------------------------------------------------------------------- SFT


def check_sft(cfg, config_path: Optional[str], overrides=None, *, settings=()) -> CheckResult:
    """Check an SFT recipe (`SFTConfig`, possibly with `settings` problems already found in it) and its data.
    Nothing is written: with skip_bad_records the rows for rejects.jsonl are in the result."""
    import torch

    where = _Where(config_path, overrides)
    result = CheckResult(problems=list(settings))
    bad_keys = {p.field.split("[")[0] for p in settings}
    if cfg.bf16 and not torch.cuda.is_available() and not cfg.use_cpu:
        result.problems.append(
            where.problem("bf16", "true needs a CUDA GPU and none is visible; on a CPU set use_cpu: true as well")
        )
    result.problems += _trackers(where, cfg.report_to)
    if "deepspeed" not in bad_keys:
        result.problems += _deepspeed(where, cfg.deepspeed)

    model = None
    if "model_name_or_path" not in bad_keys:
        model, found = _model(where, cfg.model_name_or_path)
        result.problems += found
    if model is not None and cfg.agto_layers and "agto_layers" not in bad_keys:
        result.problems += _layers(where, "agto_layers", cfg.agto_layers, model.num_layers)
    if not cfg.train_file or not os.path.isfile(cfg.train_file):
        return result
    loaded = _records(result, cfg.train_file, "sft", cfg.skip_bad_records, format=cfg.data_format)
    # Measuring needs a model and the settings it measures against (the others stay reported).
    if model is None or bad_keys & {"max_length", "min_pixels", "max_pixels", "agto_empty"}:
        return result
    from .data.collator import QwenVLCollator

    try:
        collator = QwenVLCollator(model.processor, max_length=cfg.max_length, **cfg.pixels(model.processor))
    except (TypeError, ValueError) as exc:
        key = "min_pixels" if "pixels" in str(exc) else "model_name_or_path"
        result.problems.append(where.problem(key, _one_line(exc)))
        return result

    def judge(record, m):
        out = []
        if m.last_vision >= cfg.max_length:
            out.append(
                (
                    "max_length",
                    f"record {record.id!r} is {m.length} tokens and its image tokens end at token {m.last_vision + 1}; "
                    f"max_length={cfg.max_length} would cut an image (raise max_length or lower max_pixels, now "
                    f"{cfg.max_pixels})",
                )
            )
        elif m.first_response is None or m.first_response >= cfg.max_length:
            out.append(
                ("max_length", f"record {record.id!r}: no target token is left within max_length={cfg.max_length}")
            )
        if min(m.length, cfg.max_length) > model.context:
            out.append(
                (
                    "max_length",
                    f"record {record.id!r} is {m.length} tokens; the model's context holds {model.context} (lower "
                    "max_length or shorten the record)",
                )
            )
        groups = (("image", m.has_image), ("system", m.has_system), ("user", m.has_user))
        missing = [name for name, has in groups if not has]
        if missing and cfg.agto_empty == "error":
            out.append(
                (
                    "agto_empty",
                    f"record {record.id!r} has no {' and no '.join(missing)} tokens, so the AGTO attention terms "
                    f"have nothing to measure; give it {' and '.join(_GIVE[name] for name in missing)}, or set "
                    "agto_empty: skip to train it on L_LM alone",
                )
            )
        return out

    good, bad = _measure_all(loaded, cfg.train_file, collator, judge)
    _finish(result, good, bad, cfg.skip_bad_records, cfg.train_file)
    if not good and not any(p.kind == "data" for p in result.problems):
        result.problems.append(Problem(cfg.train_file, "train_file", "no record is left to train on", "data"))
    return result


def check_steer(cfg, config_path: Optional[str], overrides=None, *, settings=()) -> CheckResult:
    """Check a steering recipe (`SteerConfig`): everything `check_sft` checks, then the tables' layer and head
    indices against the model and the steering file it starts from (`init_steering`)."""
    result = check_sft(cfg, config_path, overrides, settings=settings)
    where = _Where(config_path, overrides)
    bad_keys = {p.field.split("[")[0] for p in settings}
    if "model_name_or_path" in bad_keys:
        return result
    model, found = _model(where, cfg.model_name_or_path)
    if model is None:
        return result  # check_sft reported it
    if cfg.steer_layers and "steer_layers" not in bad_keys:
        result.problems += _layers(where, "steer_layers", cfg.steer_layers, model.num_layers)
    if cfg.steer_heads and "steer_heads" not in bad_keys and model.num_heads:
        from avar_ops.core import select_indices

        try:
            select_indices(cfg.steer_heads, model.num_heads, "steer_heads")
        except (TypeError, ValueError) as exc:
            reason = str(exc).removeprefix("steer_heads: ") + f" (the model has {model.num_heads} heads)"
            result.problems.append(where.problem("steer_heads", reason))
    if cfg.init_steering and "init_steering" not in bad_keys and model.num_heads:
        from avar_ops.hf import SteeringError, load_steering

        try:
            start = load_steering(cfg.init_steering)
            start.check_fits(model_type="qwen2_5_vl", num_layers=model.num_layers, num_heads=model.num_heads)
        except SteeringError as exc:
            result.problems.append(where.problem("init_steering", str(exc)))
        else:
            reason = cfg.outside_bounds(start.bias.flatten().tolist(), start.logit_scale.flatten().tolist())
            if reason:
                result.problems.append(where.problem("init_steering", f"its tables {reason}"))
    return result


# ------------------------------------------------------------------------------------------------------ GRPO


def _reward_functions(where: _Where, cfg) -> List[Problem]:
    from .grpo.rewards import load_reward_function

    out = []
    specs = [("accuracy_checker", cfg.accuracy_checker)] if cfg.accuracy_checker else []
    specs += [("reward_funcs", s) for s in cfg.reward_funcs or ()]
    for key, spec in specs:
        try:
            load_reward_function(spec)
        except Exception as exc:  # noqa: BLE001 - user code: anything it raises on import is the answer
            out.append(where.problem(key, _one_line(exc)))
    return out


def check_grpo(cfg, config_path: Optional[str], overrides=None, *, settings=()) -> CheckResult:
    """Check a GRPO recipe (`GRPOConfig`) and its data; see `check_sft`."""
    where = _Where(config_path, overrides)
    result = CheckResult(problems=list(settings))
    bad_keys = {p.field.split("[")[0] for p in settings}
    if "train_file" not in bad_keys and cfg.train_file and not os.path.isfile(cfg.train_file):
        result.problems.append(where.problem("train_file", f"no such file {cfg.train_file!r}"))
    result.problems += _trackers(where, cfg.report_to)
    result.problems += _deepspeed(where, None)
    if not bad_keys & {"reward_funcs", "accuracy_checker"}:
        result.problems += _reward_functions(where, cfg)
    model = None
    if "model_name_or_path" not in bad_keys:
        model, found = _model(where, cfg.model_name_or_path, cfg.min_pixels, cfg.max_pixels)
        result.problems += found
    if model is not None and cfg.visual_layers and "visual_layers" not in bad_keys:
        result.problems += _layers(where, "visual_layers", cfg.visual_layers, model.num_layers)
    if not cfg.train_file or not os.path.isfile(cfg.train_file):
        return result
    loaded = _records(result, cfg.train_file, "rl", cfg.skip_bad_records, format=cfg.data_format)
    if model is None or bad_keys & {"max_prompt_length", "max_completion_length", "min_pixels", "max_pixels"}:
        return result
    from .data.collator import QwenVLCollator

    try:
        collator = QwenVLCollator(
            model.processor, mode="prompt", max_length=1 << 30, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels
        )
    except (TypeError, ValueError) as exc:
        result.problems.append(where.problem("min_pixels", _one_line(exc)))
        return result

    def judge(record, m):
        if cfg.max_prompt_length is not None and m.length > cfg.max_prompt_length:
            return [
                (
                    "max_prompt_length",
                    f"record {record.id!r}: the prompt is {m.length} tokens, over max_prompt_length="
                    f"{cfg.max_prompt_length} (a prompt is never cut)",
                )
            ]
        if m.length + cfg.max_completion_length > model.context:
            return [
                (
                    "max_completion_length",
                    f"record {record.id!r}: the prompt is {m.length} tokens; with max_completion_length="
                    f"{cfg.max_completion_length} a rollout passes the model's context of {model.context}",
                )
            ]
        return []

    good, bad = _measure_all(loaded, cfg.train_file, collator, judge)
    _finish(result, good, bad, cfg.skip_bad_records, cfg.train_file)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    per_step = world * cfg.per_device_train_batch_size // cfg.num_generations
    if bad_keys.isdisjoint({"per_device_train_batch_size", "num_generations"}) and 0 < len(good) < per_step:
        result.problems.append(
            where.problem(
                "per_device_train_batch_size",
                f"a step takes {per_step} prompts ({world} process(es) × {cfg.per_device_train_batch_size} rollouts / "
                f"num_generations={cfg.num_generations}) but {cfg.train_file} holds {len(good)} usable records",
            )
        )
    return result


# ------------------------------------------------------------------------------------------------------ VARD


def check_vard(cfg, config_path: Optional[str], overrides=None, *, settings=()) -> CheckResult:
    """Check a VARD recipe and open every input record and image (the generator is reached only by the run)."""
    result = CheckResult(problems=list(settings))
    if cfg.input_file and os.path.isfile(cfg.input_file):
        _records(
            result,
            cfg.input_file,
            "any",
            cfg.skip_bad_records,
            cfg.limit if (cfg.limit or 0) > 0 else None,
            format=cfg.data_format,
        )
        result.rejects = []  # the run reads the file itself and writes its own rejects
    return result
