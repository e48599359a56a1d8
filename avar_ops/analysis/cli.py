"""The `avar` command: VAS measurement, generation with the intervention, α sweeps, the demo, and benchmark
evaluation with the VAS-accuracy correlation.

    avar vas      --model DIR --data FILE.jsonl --limit 200 --out DIR [--compare DIR2 ...]
    avar generate --model DIR --image PATH --question "..." [--alpha-img 0.15 --alpha-sys 0.2 --mode weights]
    avar sweep    --model DIR --data FILE.jsonl --alphas 0 0.15 0.15:0.2 0.3:0.4 --out DIR
    avar demo     [--out DIR]
    avar eval     --model DIR --bench mathvista=PATH mmstar=PATH ... [--limit N] --out RUN
    avar correlate RUN1 RUN2 RUN3 ... --out DIR

--model is "tiny" (the default: a tiny random Qwen2.5-VL with an offline processor, for trying things out) or a
local checkpoint directory (e.g. Qwen2.5-VL-7B-Instruct), loaded with local_files_only=True.

Arguments, the output folder, the data and its images are checked before the model loads; a problem is one line
on stderr and exit status 2 (the command line: values, flags, paths) or 1 (the content of a file it names).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import re
import sys
import tempfile
from typing import List, Optional, Sequence, Tuple

from avar_ops.analysis.evaluation.commands import add_parsers as add_evaluation_parsers
from avar_ops.analysis.paths import inside, safe_name, unique_safe_names

__all__ = ["main", "load_model", "CLIError", "DataError", "MAX_NEW_TOKENS"]

# Far beyond any answer the tools measure, and a bound on how long one command can run per sample.
MAX_NEW_TOKENS = 4096
# What the kernels take per device (--dtype); float64 is the CPU reference's, not a model dtype.
_DEVICE_DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("float16", "bfloat16")}


class CLIError(Exception):
    """A user error the command reports in one line instead of a traceback: the command line is wrong (exit 2)."""

    code = 2


class DataError(CLIError):
    """The content of a file the command line names is wrong (exit 1)."""

    code = 1


# ---------------------------------------------------------------------------------------------------- model


def _dtype(name: str):
    import torch

    table = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise CLIError(f"--dtype: expected one of {sorted(table)}, got {name!r}")
    return table[name]


def model_shape(spec: Optional[str], arg: str = "--model") -> Tuple[int, int, str]:
    """(decoder layers, attention heads, weights dtype name) of "tiny" / None or a checkpoint folder, read from
    its config.json without loading weights, so that indices and dtypes are checked before the model loads."""
    if spec in (None, "tiny"):
        from avar_ops.analysis.tiny_qwen import build_tiny_qwen2_5_vl

        params = inspect.signature(build_tiny_qwen2_5_vl).parameters
        return int(params["num_layers"].default), int(params["num_heads"].default), "float32"
    if not os.path.exists(spec):
        raise CLIError(f"{arg}: {spec!r} does not exist (expected 'tiny' or a local checkpoint directory)")
    if not os.path.isdir(spec):
        raise CLIError(f"{arg}: {spec!r} is a file; expected 'tiny' or a checkpoint directory with config.json")
    config_path = os.path.join(spec, "config.json")
    if not os.path.isfile(config_path):
        raise CLIError(f"{arg}: {spec!r} has no config.json; it is not a Hugging Face checkpoint directory")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{arg}: {config_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("model_type") != "qwen2_5_vl":
        model_type = config.get("model_type") if isinstance(config, dict) else None
        raise CLIError(f"{arg}: {spec!r} holds a {model_type!r} model; avar supports Qwen2.5-VL ('qwen2_5_vl')")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    # Older checkpoints keep the text model's numbers at the top level.
    layers = text.get("num_hidden_layers", config.get("num_hidden_layers"))
    heads = text.get("num_attention_heads", config.get("num_attention_heads"))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (layers, heads)):
        raise DataError(f"{arg}: {config_path} has no positive num_hidden_layers / num_attention_heads")
    dtype = text.get("dtype") or text.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype")
    return layers, heads, str(dtype or "float32")


def load_model(spec: Optional[str], *, dtype: str = "auto", device: str = "cpu"):
    """(model, processor, label) for "tiny" / None or a local Qwen2.5-VL checkpoint directory."""
    import torch

    if spec in (None, "tiny"):
        from avar_ops.analysis.tiny_qwen import build_tiny_qwen2_5_vl

        dt = _dtype(dtype)
        model, processor = build_tiny_qwen2_5_vl(seed=0, dtype=torch.float32 if dt == "auto" else dt)
        return model.to(device), processor, "tiny"
    model_shape(spec)
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            spec, local_files_only=True, dtype=_dtype(dtype), attn_implementation="sdpa"
        )
        processor = AutoProcessor.from_pretrained(spec, local_files_only=True)
    except OSError as exc:
        raise CLIError(f"--model: cannot load {spec!r}: {exc}") from exc
    return model.to(device).eval(), processor, os.path.basename(os.path.normpath(spec))


# ---------------------------------------------------------------------------------------------- arguments


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (default: a tiny random Qwen2.5-VL, offline) or a local checkpoint directory",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (auto: the checkpoint's own; float32 for the tiny model)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def _add_intervention_args(p: argparse.ArgumentParser, *, with_values: bool = True) -> None:
    p.add_argument(
        "--mode",
        default="weights",
        choices=["weights", "logits", "bias"],
        help="weights: scale attention weights by (1+α) and renormalise (= logit bias log(1+α)); "
        "logits: scale logits by (1+α); bias: add β to the logits",
    )
    if with_values:
        p.add_argument("--alpha-img", type=float, default=0.0, help="α_img (modes weights, logits)")
        p.add_argument("--alpha-sys", type=float, default=0.0, help="α_sys, must be < 1 (modes weights, logits)")
        p.add_argument("--beta-img", type=float, default=0.0, help="β on image-key logits (mode bias)")
        p.add_argument("--beta-sys", type=float, default=0.0, help="β on system-key logits (mode bias)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="decoder layers to act on (default all)")
    p.add_argument("--heads", type=int, nargs="+", default=None, help="heads to act on (default all)")


def _intervention(args, img: float, sys_: float):
    """An Intervention from the mode and one (image, system) pair of values, or None when both are 0."""
    from avar_ops.method import Intervention

    if img == 0.0 and sys_ == 0.0:
        return None
    try:
        if args.mode == "bias":
            return Intervention(mode="bias", beta_img=img, beta_sys=sys_, layers=args.layers, heads=args.heads)
        return Intervention(mode=args.mode, alpha_img=img, alpha_sys=sys_, layers=args.layers, heads=args.heads)
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from exc


def _check_selection(args, ivs, shape) -> None:
    """--layers / --heads (only meaningful with an intervention), --vas-layers and --heatmap-layers against the
    model's layer and head counts, with `avar_ops.core.select_indices`' rule (−n ≤ i < n)."""
    from avar_ops.core import select_indices

    num_layers, num_heads, _ = shape
    if all(iv is None for iv in ivs) and (args.layers is not None or args.heads is not None):
        values = "--beta-img / --beta-sys" if args.mode == "bias" else "--alpha-img / --alpha-sys"
        if args.command == "sweep":
            values = "a non-zero --alphas setting"
        raise CLIError(
            f"--layers / --heads choose where the intervention acts, but no intervention is given ({values})"
        )
    checks = [("--layers", args.layers, num_layers), ("--heads", args.heads, num_heads)]
    checks += [
        (f"--{name.replace('_', '-')}", getattr(args, name, None), num_layers)
        for name in ("vas_layers", "heatmap_layers")
    ]
    for flag, value, count in checks:
        try:
            select_indices(value, count, flag)
        except (ValueError, TypeError) as exc:
            raise CLIError(f"{exc} (the model has {num_layers} layers of {num_heads} heads)") from None


def _check_device(args, shape) -> None:
    """--device names a device that is there, and --dtype (or the checkpoint's own) is one its kernels take."""
    import torch

    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}") from None
    if device.type not in _DEVICE_DTYPES:
        raise CLIError(f"--device: avar runs on cpu or cuda, got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {args.device}: PyTorch sees no CUDA GPU here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices")
    dtype = shape[2] if args.dtype == "auto" else args.dtype
    allowed = _DEVICE_DTYPES[device.type]
    if dtype not in allowed:
        source = f"--dtype {args.dtype}" if args.dtype != "auto" else f"the checkpoint's dtype ({dtype})"
        raise CLIError(
            f"{source}: the {device.type.upper()} kernels take {' or '.join(allowed)}; "
            f"pass --dtype {allowed[-1]}" + (" or --device cuda" if device.type == "cpu" else "")
        )


def _prepare_out(out: str, command: str, results: Sequence[str]) -> str:
    """Create --out (or accept an existing folder) and check that a file can be written in it."""
    if not out or not out.strip():
        raise CLIError("--out: expected a folder path, got an empty string")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out: {out!r} is a file; expected a folder")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise CLIError(f"--out: cannot write in {out!r} ({exc.strerror or exc})") from None
    existing = [name for name in results if os.path.exists(os.path.join(out, name))]
    if existing:
        print(f"avar {command}: note: overwriting {', '.join(existing)} in {out}", file=sys.stderr)
    return out


def _check_batches(samples, batch_size: int) -> None:
    """A batch is padded into one processor call, which cannot mix samples with and without images."""
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        with_img = [s["id"] for s in batch if s["images"]]
        without = [s["id"] for s in batch if not s["images"]]
        if with_img and without:
            raise CLIError(
                f"--batch-size {batch_size}: samples {with_img} have images and {without} do not, in one batch; "
                "use --batch-size 1 or order the data so that they fall in different batches"
            )


def _intervention_from_flags(args):
    if args.mode == "bias":
        if args.alpha_img or args.alpha_sys:
            raise CLIError("--mode bias reads --beta-img / --beta-sys; --alpha-img / --alpha-sys were given")
        return _intervention(args, args.beta_img, args.beta_sys)
    if args.beta_img or args.beta_sys:
        raise CLIError(f"--mode {args.mode} reads --alpha-img / --alpha-sys; --beta-img / --beta-sys were given")
    return _intervention(args, args.alpha_img, args.alpha_sys)


def _parse_alpha(token: str, default_sys: float):
    """'IMG' or 'IMG:SYS' -> (img, sys)."""
    parts = token.strip().split(":")
    try:
        if len(parts) == 1:
            return float(parts[0]), default_sys
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    raise CLIError(f"--alphas: expected IMG or IMG:SYS numbers, got {token!r}")


def _load_samples(path: str, limit: Optional[int]):
    """The samples of --data, their images decoded once: a missing path is exit 2, bad content exit 1."""
    from avar_ops.analysis.samples import check_images, load_samples

    if not os.path.exists(path):
        raise CLIError(f"--data: data file not found: {path}")
    if not os.path.isfile(path):
        raise CLIError(f"--data: {path!r} is a folder; expected a JSONL file")
    try:
        samples = load_samples(path, limit)
        check_images(samples)
    except (OSError, ValueError) as exc:
        raise DataError(f"--data: {exc}") from None
    return samples


# ------------------------------------------------------------------------------------------------- commands


def _cmd_vas(args) -> int:
    from avar_ops.analysis import vas
    from avar_ops.analysis.image_attention import image_attention, save_overlays

    out = _prepare_out(args.out, "vas", ["vas.json", "vas_heatmap.png", "lazy_attention.png", "compare.png"])
    samples = _load_samples(args.data, args.limit)
    _check_batches(samples, args.batch_size)
    iv = _intervention_from_flags(args)
    shape = model_shape(args.model)
    _check_selection(args, [iv], shape)
    _check_device(args, shape)
    drawn = [s for s in samples[: args.heatmaps] if s["images"]]
    try:
        heatmap_names = unique_safe_names([s["id"] for s in drawn], "--heatmaps: sample ids")
    except ValueError as exc:
        raise DataError(str(exc)) from None
    compares = _compare_sources(args.compare or [], args)

    model, processor, label = load_model(args.model, dtype=args.dtype, device=args.device)
    label = args.label or label
    report = vas.measure(
        model,
        processor,
        samples,
        layers=args.vas_layers,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        label=label,
        intervention=iv,
    )
    paths = report.save(out)
    print(report.summary())
    for sample, name in zip(drawn, heatmap_names):
        res = image_attention(
            model,
            processor,
            sample,
            layers=args.heatmap_layers,
            queries=args.heatmap_queries,
            intervention=iv,
            max_new_tokens=args.max_new_tokens,
        )
        for p in save_overlays(res, sample, out, prefix=f"attention_sample{name}"):
            paths[f"heatmap_{name}_{os.path.basename(p)}"] = p
    reports = [report]
    for kind, value, folder in compares:
        if kind == "report":
            reports.append(value)
        else:
            reports.append(_measure_other(value, args, samples, inside(out, "compare", folder)))
        print(reports[-1].summary())
    if len(reports) > 1:
        paths["compare"] = vas.compare(reports, inside(out, "compare.png"))
    for name, p in paths.items():
        print(f"  {name}: {p}")
    return 0


def _compare_sources(specs: Sequence[str], args) -> list:
    """Each --compare entry as ("report", VASReport, None) or ("model", path, folder under out/compare), checked
    (reports read, checkpoint configs read) before any model loads."""
    from avar_ops.analysis import vas

    sources, folders = [], set()
    for spec in specs:
        report_file = spec if os.path.isfile(spec) and spec.endswith(".json") else os.path.join(spec, "vas.json")
        if os.path.isfile(report_file):
            try:
                sources.append(("report", vas.VASReport.load(report_file), None))
            except (OSError, ValueError) as exc:
                raise DataError(f"--compare: {exc}") from None
            continue
        shape = model_shape(spec, "--compare")
        _check_selection(args, [None], shape)
        _check_device(args, shape)
        folder = base = safe_name(os.path.basename(os.path.normpath(spec)), default="model")
        n = 1
        while folder in folders:  # two checkpoints in folders of the same name: their reports must not collide
            n += 1
            folder = f"{base}_{n}"
        folders.add(folder)
        sources.append(("model", spec, folder))
    return sources


def _measure_other(spec: str, args, samples, folder: str):
    from avar_ops.analysis import vas

    model, processor, label = load_model(spec, dtype=args.dtype, device=args.device)
    report = vas.measure(
        model,
        processor,
        samples,
        layers=args.vas_layers,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        label=label,
    )
    report.save(folder)
    return report


def _cmd_generate(args) -> int:
    from avar_ops.analysis.samples import check_images, generate_answers, normalize_sample

    for p in args.image:
        if os.path.isdir(p):
            raise CLIError(f"--image: {p!r} is a folder; expected an image file")
        if not os.path.isfile(p):
            raise CLIError(f"--image: file not found: {p}")
    try:
        sample = normalize_sample(
            {"images": args.image, "question": args.question, "system": args.system}, 0, where="arguments"
        )
    except ValueError as exc:
        raise CLIError(f"--question / --system: {exc}") from None
    try:
        check_images([sample])
    except ValueError as exc:
        raise DataError(f"--image: {exc}") from None
    iv = _intervention_from_flags(args)
    shape = model_shape(args.model)
    _check_selection(args, [iv], shape)
    _check_device(args, shape)
    model, processor, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    progress = not args.no_progress
    if iv is None or args.baseline:
        base = generate_answers(model, processor, [sample], max_new_tokens=args.max_new_tokens, progress=progress)[0]
        print(f"[no intervention] {base['answer']}")
    if iv is not None:
        out = generate_answers(
            model, processor, [sample], intervention=iv, max_new_tokens=args.max_new_tokens, progress=progress
        )[0]
        print(f"[{iv.describe()}] {out['answer']}")
    return 0


def _cmd_sweep(args) -> int:
    from avar_ops.analysis import vas
    from avar_ops.analysis.samples import generate_answers

    out = _prepare_out(args.out, "sweep", ["sweep.md", "sweep.csv", "sweep.json"])
    settings = [_parse_alpha(t, args.alpha_sys) for t in args.alphas]
    ivs = [_intervention(args, img, sys_) for img, sys_ in settings]  # checks every value before loading
    samples = _load_samples(args.data, args.limit)
    _check_batches(samples, args.batch_size)
    shape = model_shape(args.model)
    _check_selection(args, ivs, shape)
    _check_device(args, shape)
    model, processor, label = load_model(args.model, dtype=args.dtype, device=args.device)
    rows, answers = [], {}
    for (img, sys_), iv in zip(settings, ivs):
        name = iv.describe() if iv is not None else "none"
        report = vas.measure(
            model,
            processor,
            samples,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            label=f"{label} {name}",
            intervention=iv,
        )
        outs = generate_answers(
            model,
            processor,
            samples,
            intervention=iv,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        answers[name] = outs
        rows.append(
            {
                "setting": name,
                "mode": args.mode,
                "img": img,
                "sys": sys_,
                "vas": report.vas,
                "ratio_of_sums": report.ratio_of_sums,
                "image_mass": report.image_mass,
                "visual_share": report.split["visual"],
                "system_share": report.split["system"],
                "samples": report.num_samples,
                "report": report.to_dict(),
            }
        )
    base = answers[rows[0]["setting"]]
    for row in rows:
        outs = answers[row["setting"]]
        row["answers_changed"] = sum(a["tokens"] != b["tokens"] for a, b in zip(outs, base))
    paths = write_sweep_table(rows, answers, samples, out)
    print(open(paths["markdown"], encoding="utf-8").read())
    for name, p in paths.items():
        print(f"  {name}: {p}")
    return 0


_TABLE_COLUMNS = (
    "setting",
    "img",
    "sys",
    "vas",
    "ratio_of_sums",
    "image_mass",
    "visual_share",
    "system_share",
    "samples",
    "answers_changed",
)


def write_sweep_table(rows: List[dict], answers: dict, samples: Sequence[dict], out_dir: str) -> dict:
    """sweep.md (summary and answers), sweep.csv (summary), sweep.json (everything, reports included)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "markdown": os.path.join(out_dir, "sweep.md"),
        "csv": os.path.join(out_dir, "sweep.csv"),
        "json": os.path.join(out_dir, "sweep.json"),
    }
    first = rows[0]["setting"]
    lines = [
        f"# Intervention sweep ({rows[0]['mode']}; img/sys are α_img/α_sys, or β_img/β_sys in mode bias)",
        "",
        "| setting | img | sys | VAS | ratio of sums | image mass | visual share | system share | samples "
        f"| answers changed vs {first} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['img']:g} | {r['sys']:g} | {r['vas']:.4g} | {r['ratio_of_sums']:.4g} | "
            f"{r['image_mass']:.4g} | {r['visual_share']:.4f} | {r['system_share']:.4f} | {r['samples']} | "
            f"{r['answers_changed']} |"
        )
    lines += [
        "",
        "## Answers",
        "",
        "| sample | " + " | ".join(r["setting"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for i, s in enumerate(samples):
        cells = [_md_cell(answers[r["setting"]][i]["answer"]) for r in rows]
        lines.append(f"| {_md_cell(s['id'])} | " + " | ".join(cells) + " |")
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(paths["csv"], "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(_TABLE_COLUMNS)
        for r in rows:
            w.writerow([r[c] for c in _TABLE_COLUMNS])
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "answers": answers}, f, indent=1)
    return paths


def _md_cell(text: str, limit: int = 80) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cmd_demo(args) -> int:
    from avar_ops.analysis.demo import run_demo

    run_demo(_prepare_out(args.out, "demo", ["baseline", "intervention", "compare.png"]))
    return 0


# ----------------------------------------------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the usage text stays behind --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# A negative IMG:SYS pair ("-0.5:0.2") starts like an option; argparse only takes plain negative numbers as values.
_NEGATIVE_PAIR = re.compile(r"^-[0-9.][0-9.eE+-]*:[0-9.eE+-]*$")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="avar", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="{vas,generate,sweep,demo,eval,correlate}")
    sub.required = True

    p = sub.add_parser("vas", help="measure VAS and the lazy-attention split; write JSON and figures")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="JSONL: {images|image, question, system?} per line")
    p.add_argument("--limit", type=int, default=None, help="use the first N samples")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--label", default=None, help="name of the model in reports (default: folder name)")
    p.add_argument(
        "--compare",
        nargs="+",
        default=None,
        help="other checkpoints (or saved report folders) to overlay in compare.png",
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--vas-layers", type=int, nargs="+", default=None, help="layers to average VAS over (default all)")
    p.add_argument("--heatmaps", type=int, default=0, help="draw image attention maps for the first N samples")
    p.add_argument("--heatmap-layers", type=int, nargs="+", default=[-1], help="layers for the image maps")
    p.add_argument("--heatmap-queries", choices=["user", "response"], default="user")
    p.add_argument("--max-new-tokens", type=int, default=32, help="response length for --heatmap-queries response")
    p.add_argument("--no-progress", action="store_true")
    _add_intervention_args(p)

    p = sub.add_parser("generate", help="answer one question about images, with or without the intervention")
    _add_model_args(p)
    p.add_argument("--image", nargs="+", required=True, help="image path(s)")
    p.add_argument("--question", required=True)
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--max-new-tokens", type=int, default=64, help=f"answer length (at most {MAX_NEW_TOKENS})")
    p.add_argument("--baseline", action="store_true", help="also print the answer without the intervention")
    p.add_argument("--no-progress", action="store_true")
    _add_intervention_args(p)

    p = sub.add_parser("sweep", help="VAS and answers for several intervention strengths; writes a table")
    _add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument(
        "--alphas",
        nargs="+",
        required=True,
        help="settings IMG or IMG:SYS (α in modes weights/logits, β in mode bias), e.g. 0 0.15 0.15:0.2",
    )
    p.add_argument("--alpha-sys", type=float, default=0.0, help="system value for settings given as IMG alone")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-progress", action="store_true")
    _add_intervention_args(p, with_values=False)

    p = sub.add_parser("demo", help="tiny random Qwen2.5-VL: VAS, intervention, figures (offline, CPU)")
    p.add_argument("--out", default="avar_demo_out", help="output folder (default ./avar_demo_out)")
    add_evaluation_parsers(sub)
    return parser


_COMMANDS = {"vas": _cmd_vas, "generate": _cmd_generate, "sweep": _cmd_sweep, "demo": _cmd_demo}


def _check_counts(args) -> None:
    for name in ("limit", "batch_size", "heatmaps", "max_new_tokens"):
        value = getattr(args, name, None)
        flag = f"--{name.replace('_', '-')}"
        if value is not None and value < (0 if name == "heatmaps" else 1):
            raise CLIError(
                f"{flag}: expected a {'non-negative' if name == 'heatmaps' else 'positive'} number, got {value}"
            )
    if getattr(args, "max_new_tokens", 0) > MAX_NEW_TOKENS:
        raise CLIError(f"--max-new-tokens: at most {MAX_NEW_TOKENS}, got {args.max_new_tokens}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # A leading space makes argparse read the pair as a value; _parse_alpha strips it.
    argv = [" " + a if _NEGATIVE_PAIR.match(a) else a for a in argv]
    args = parser.parse_args(argv)
    try:
        _check_counts(args)
        run = getattr(args, "run_command", None) or _COMMANDS[args.command]
        return run(args)
    except CLIError as exc:
        print(f"avar {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.code
    except (ValueError, OSError) as exc:
        # What the checks before loading cannot see (e.g. a sample the model cannot measure): still one line.
        print(f"avar {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
