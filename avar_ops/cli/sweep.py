"""`avar sweep`: VAS and answers for several intervention strengths, written as one table."""

from __future__ import annotations

import csv
import json
import os
from typing import List, Sequence

from avar_ops.cli import loading
from avar_ops.cli.args import (
    add_data_format_arg,
    add_intervention_args,
    add_model_args,
    check_batches,
    check_device,
    check_selection,
    intervention,
    load_data,
    steering_from_flag,
)
from avar_ops.cli.errors import CLIError
from avar_ops.cli.out import add_out_flags, check_out, open_out

__all__ = ["add_parser", "run", "write_sweep_table"]


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="VAS and answers for several intervention strengths; writes a table")
    add_model_args(p)
    p.add_argument("--data", required=True)
    add_data_format_arg(p)
    p.add_argument(
        "--alphas",
        nargs="+",
        required=True,
        help="settings IMG or IMG:SYS (α in modes weights/logits, β in mode bias), e.g. 0 0.15 0.15:0.2",
    )
    p.add_argument("--alpha-sys", type=float, default=0.0, help="system value for settings given as IMG alone")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", required=True, help="output folder (a new or empty one, or one of --overwrite)")
    add_out_flags(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-progress", action="store_true")
    add_intervention_args(p, with_values=False)
    p.set_defaults(run_command=run)


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


def run(args) -> int:
    import avar_ops.analysis as analysis

    out = check_out(args.out)
    settings = [_parse_alpha(t, args.alpha_sys) for t in args.alphas]
    ivs = [intervention(args, img, sys_) for img, sys_ in settings]  # checks every value before loading
    steering = steering_from_flag(args)
    if steering is not None:  # learned tables: one more row, measured the same way
        settings.append((None, None))
        ivs.append(steering)
    samples = load_data(args.data, args.limit, args.data_format)
    check_batches(samples, args.batch_size)
    shape = loading.model_shape(args.model)
    check_selection(args, ivs, shape)
    check_device(args, shape)
    # Every check passed: take the folder (the policy may remove an old run with --overwrite) and run.
    with open_out(args, "sweep") as run_folder:
        model, processor, label = loading.load_model(args.model, dtype=args.dtype, device=args.device)
        rows, answers = [], {}
        for (img, sys_), iv in zip(settings, ivs):
            name = iv.describe() if iv is not None else "none"
            report = analysis.measure(
                model,
                processor,
                samples,
                batch_size=args.batch_size,
                progress=not args.no_progress,
                label=f"{label} {name}",
                intervention=iv,
            )
            outs = analysis.generate_answers(
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
                    "mode": "steer" if img is None else args.mode,
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
        run_folder.finish()
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


def _value(v) -> str:
    return "—" if v is None else f"{v:g}"  # a steering file's row has no single α


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
            f"| {r['setting']} | {_value(r['img'])} | {_value(r['sys'])} | {r['vas']:.4g} | {r['ratio_of_sums']:.4g} | "
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
