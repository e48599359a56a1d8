"""The `avar` command: VAS measurement, generation with the intervention, α sweeps, and the demo.

    avar vas      --model DIR --data FILE.jsonl --limit 200 --out DIR [--compare DIR2 ...]
    avar generate --model DIR --image PATH --question "..." [--alpha-img 0.15 --alpha-sys 0.2 --mode weights]
    avar sweep    --model DIR --data FILE.jsonl --alphas 0 0.15 0.15:0.2 0.3:0.4 --out DIR
    avar demo     [--out DIR]

--model is "tiny" (the default: a tiny random Qwen2.5-VL with an offline processor, for trying things out) or a
local checkpoint directory (e.g. Qwen2.5-VL-7B-Instruct), loaded with local_files_only=True.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import List, Optional, Sequence

__all__ = ["main", "load_model", "CLIError"]


class CLIError(Exception):
    """A user error the command reports in one line (bad path, bad value) instead of a traceback."""


# ---------------------------------------------------------------------------------------------------- model


def _dtype(name: str):
    import torch

    table = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise CLIError(f"--dtype: expected one of {sorted(table)}, got {name!r}")
    return table[name]


def load_model(spec: Optional[str], *, dtype: str = "auto", device: str = "cpu"):
    """(model, processor, label) for "tiny" / None or a local Qwen2.5-VL checkpoint directory."""
    import torch

    if spec in (None, "tiny"):
        from avar_ops.analysis.tiny_qwen import build_tiny_qwen2_5_vl

        dt = _dtype(dtype)
        model, processor = build_tiny_qwen2_5_vl(seed=0, dtype=torch.float32 if dt == "auto" else dt)
        return model.to(device), processor, "tiny"
    if not os.path.exists(spec):
        raise CLIError(f"--model: {spec!r} does not exist (expected 'tiny' or a local checkpoint directory)")
    if not os.path.isdir(spec):
        raise CLIError(f"--model: {spec!r} is a file; expected 'tiny' or a checkpoint directory with config.json")
    config_path = os.path.join(spec, "config.json")
    if not os.path.isfile(config_path):
        raise CLIError(f"--model: {spec!r} has no config.json; it is not a Hugging Face checkpoint directory")
    with open(config_path, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type != "qwen2_5_vl":
        raise CLIError(f"--model: {spec!r} holds a {model_type!r} model; avar supports Qwen2.5-VL ('qwen2_5_vl')")
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            spec, local_files_only=True, dtype=_dtype(dtype), attn_implementation="sdpa")
        processor = AutoProcessor.from_pretrained(spec, local_files_only=True)
    except OSError as exc:
        raise CLIError(f"--model: cannot load {spec!r}: {exc}") from exc
    return model.to(device).eval(), processor, os.path.basename(os.path.normpath(spec))


# ---------------------------------------------------------------------------------------------- arguments


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="'tiny' (default: a tiny random Qwen2.5-VL, offline) or a local checkpoint directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: the checkpoint's own; float32 for the tiny model)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def _add_intervention_args(p: argparse.ArgumentParser, *, with_values: bool = True) -> None:
    p.add_argument("--mode", default="weights", choices=["weights", "logits", "bias"],
                   help="weights: scale attention weights by (1+α) and renormalise (= logit bias log(1+α)); "
                        "logits: scale logits by (1+α); bias: add β to the logits")
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


def _intervention_from_flags(args):
    if args.mode == "bias":
        if args.alpha_img or args.alpha_sys:
            raise CLIError("--mode bias reads --beta-img / --beta-sys; --alpha-img / --alpha-sys were given")
        return _intervention(args, args.beta_img, args.beta_sys)
    if args.beta_img or args.beta_sys:
        raise CLIError(f"--mode {args.mode} reads --alpha-img / --alpha-sys; --beta-img / --beta-sys were given")
    return _intervention(args, args.alpha_img, args.alpha_sys)


def _check_fits(ivs, model) -> None:
    """Layer and head indices of the interventions against the loaded model, as one-line errors."""
    text = getattr(model.config, "text_config", None) or model.config
    for iv in ivs:
        if iv is None:
            continue
        try:
            iv.tables(int(text.num_hidden_layers), int(text.num_attention_heads))
        except (ValueError, TypeError) as exc:
            raise CLIError(f"--layers / --heads: {exc}") from exc


def _parse_alpha(token: str, default_sys: float):
    """'IMG' or 'IMG:SYS' -> (img, sys)."""
    parts = token.split(":")
    try:
        if len(parts) == 1:
            return float(parts[0]), default_sys
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    raise CLIError(f"--alphas: expected IMG or IMG:SYS numbers, got {token!r}")


def _load_samples(path: str, limit: Optional[int]):
    from avar_ops.analysis.samples import load_samples

    if limit is not None and limit <= 0:
        raise CLIError(f"--limit: expected a positive number, got {limit}")
    try:
        return load_samples(path, limit)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(f"--data: {exc}") from exc


# ------------------------------------------------------------------------------------------------- commands


def _cmd_vas(args) -> int:
    from avar_ops.analysis import vas
    from avar_ops.analysis.image_attention import image_attention, save_overlays

    samples = _load_samples(args.data, args.limit)
    iv = _intervention_from_flags(args)
    model, processor, label = load_model(args.model, dtype=args.dtype, device=args.device)
    _check_fits([iv], model)
    label = args.label or label
    report = vas.measure(model, processor, samples, layers=args.vas_layers, batch_size=args.batch_size,
                         progress=not args.no_progress, label=label, intervention=iv)
    paths = report.save(args.out)
    print(report.summary())
    for n, sample in enumerate(samples[: args.heatmaps]):
        if not sample["images"]:
            continue
        res = image_attention(model, processor, sample, layers=args.heatmap_layers, queries=args.heatmap_queries,
                              intervention=iv, max_new_tokens=args.max_new_tokens)
        for p in save_overlays(res, sample, args.out, prefix=f"attention_sample{sample['id']}"):
            paths[f"heatmap_{n}_{os.path.basename(p)}"] = p
    reports = [report]
    for other in args.compare or []:
        reports.append(_compare_report(other, args, samples))
        print(reports[-1].summary())
    if len(reports) > 1:
        paths["compare"] = vas.compare(reports, os.path.join(args.out, "compare.png"))
    for name, p in paths.items():
        print(f"  {name}: {p}")
    return 0


def _compare_report(spec: str, args, samples):
    """A saved report (a vas.json file or a folder holding one) or a model to measure on the same samples."""
    from avar_ops.analysis import vas

    if os.path.isfile(spec) and spec.endswith(".json"):
        return vas.VASReport.load(spec)
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "vas.json")):
        return vas.VASReport.load(spec)
    model, processor, label = load_model(spec, dtype=args.dtype, device=args.device)
    report = vas.measure(model, processor, samples, layers=args.vas_layers, batch_size=args.batch_size,
                         progress=not args.no_progress, label=label)
    report.save(os.path.join(args.out, "compare", _safe_name(label)))
    return report


def _safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label) or "model"


def _cmd_generate(args) -> int:
    from avar_ops.analysis.samples import generate_answers

    for p in args.image:
        if not os.path.isfile(p):
            raise CLIError(f"--image: file not found: {p}")
    iv = _intervention_from_flags(args)
    model, processor, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    _check_fits([iv], model)
    sample = {"images": args.image, "question": args.question, "system": args.system}
    if iv is None or args.baseline:
        base = generate_answers(model, processor, [sample], max_new_tokens=args.max_new_tokens)[0]
        print(f"[no intervention] {base['answer']}")
    if iv is not None:
        out = generate_answers(model, processor, [sample], intervention=iv, max_new_tokens=args.max_new_tokens)[0]
        print(f"[{iv.describe()}] {out['answer']}")
    return 0


def _cmd_sweep(args) -> int:
    from avar_ops.analysis import vas
    from avar_ops.analysis.samples import generate_answers

    samples = _load_samples(args.data, args.limit)
    settings = [_parse_alpha(t, args.alpha_sys) for t in args.alphas]
    ivs = [_intervention(args, img, sys_) for img, sys_ in settings]  # checks every value before loading
    model, processor, label = load_model(args.model, dtype=args.dtype, device=args.device)
    _check_fits(ivs, model)
    rows, answers = [], {}
    for (img, sys_), iv in zip(settings, ivs):
        name = iv.describe() if iv is not None else "none"
        report = vas.measure(model, processor, samples, batch_size=args.batch_size, progress=not args.no_progress,
                             label=f"{label} {name}", intervention=iv)
        outs = generate_answers(model, processor, samples, intervention=iv, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size)
        answers[name] = outs
        rows.append({
            "setting": name, "mode": args.mode, "img": img, "sys": sys_,
            "vas": report.vas, "ratio_of_sums": report.ratio_of_sums, "image_mass": report.image_mass,
            "visual_share": report.split["visual"], "system_share": report.split["system"],
            "samples": report.num_samples, "report": report.to_dict(),
        })
    base = answers[rows[0]["setting"]]
    for row in rows:
        outs = answers[row["setting"]]
        row["answers_changed"] = sum(a["tokens"] != b["tokens"] for a, b in zip(outs, base))
    paths = write_sweep_table(rows, answers, samples, args.out)
    print(open(paths["markdown"], encoding="utf-8").read())
    for name, p in paths.items():
        print(f"  {name}: {p}")
    return 0


_TABLE_COLUMNS = ("setting", "img", "sys", "vas", "ratio_of_sums", "image_mass", "visual_share", "system_share",
                  "samples", "answers_changed")


def write_sweep_table(rows: List[dict], answers: dict, samples: Sequence[dict], out_dir: str) -> dict:
    """sweep.md (summary and answers), sweep.csv (summary), sweep.json (everything, reports included)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"markdown": os.path.join(out_dir, "sweep.md"), "csv": os.path.join(out_dir, "sweep.csv"),
             "json": os.path.join(out_dir, "sweep.json")}
    first = rows[0]["setting"]
    lines = [
        f"# Intervention sweep ({rows[0]['mode']}; img/sys are α_img/α_sys, or β_img/β_sys in mode bias)",
        "",
        "| setting | img | sys | VAS | ratio of sums | image mass | visual share | system share | samples "
        f"| answers changed vs {first} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['img']:g} | {r['sys']:g} | {r['vas']:.4g} | {r['ratio_of_sums']:.4g} | "
                     f"{r['image_mass']:.4g} | {r['visual_share']:.4f} | {r['system_share']:.4f} | {r['samples']} | "
                     f"{r['answers_changed']} |")
    lines += ["", "## Answers", "", "| sample | " + " | ".join(r["setting"] for r in rows) + " |",
              "|---|" + "---|" * len(rows)]
    for i, s in enumerate(samples):
        cells = [_md_cell(answers[r["setting"]][i]["answer"]) for r in rows]
        lines.append(f"| {s['id']} | " + " | ".join(cells) + " |")
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

    run_demo(args.out)
    return 0


# ----------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avar", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="{vas,generate,sweep,demo}")
    sub.required = True

    p = sub.add_parser("vas", help="measure VAS and the lazy-attention split; write JSON and figures")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="JSONL: {images|image, question, system?} per line")
    p.add_argument("--limit", type=int, default=None, help="use the first N samples")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--label", default=None, help="name of the model in reports (default: folder name)")
    p.add_argument("--compare", nargs="+", default=None,
                   help="other checkpoints (or saved report folders) to overlay in compare.png")
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
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--baseline", action="store_true", help="also print the answer without the intervention")
    _add_intervention_args(p)

    p = sub.add_parser("sweep", help="VAS and answers for several intervention strengths; writes a table")
    _add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--alphas", nargs="+", required=True,
                   help="settings IMG or IMG:SYS (α in modes weights/logits, β in mode bias), e.g. 0 0.15 0.15:0.2")
    p.add_argument("--alpha-sys", type=float, default=0.0, help="system value for settings given as IMG alone")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-progress", action="store_true")
    _add_intervention_args(p, with_values=False)

    p = sub.add_parser("demo", help="tiny random Qwen2.5-VL: VAS, intervention, figures (offline, CPU)")
    p.add_argument("--out", default="avar_demo_out", help="output folder (default ./avar_demo_out)")
    return parser


_COMMANDS = {"vas": _cmd_vas, "generate": _cmd_generate, "sweep": _cmd_sweep, "demo": _cmd_demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("limit", "batch_size", "heatmaps", "max_new_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "heatmaps" else 1):
            parser.error(f"--{name.replace('_', '-')}: expected a positive number, got {value}")
    try:
        return _COMMANDS[args.command](args)
    except CLIError as exc:
        print(f"avar {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
