"""`avar vas`: VAS and the lazy-attention split over a JSONL file, image heatmaps, and comparisons with other
checkpoints or saved reports."""

from __future__ import annotations

import os
from typing import Sequence

from avar_ops.cli import loading
from avar_ops.cli.args import (
    add_data_format_arg,
    add_intervention_args,
    add_model_args,
    check_batches,
    check_device,
    check_selection,
    intervention_from_flags,
    load_data,
)
from avar_ops.cli.errors import DataError
from avar_ops.cli.out import add_out_flags, check_out, open_out
from avar_ops.data import inside, safe_name, unique_safe_names

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("vas", help="measure VAS and the lazy-attention split; write JSON and figures")
    add_model_args(p)
    p.add_argument("--data", required=True, help="JSONL: {images|image, question, system?} per line")
    add_data_format_arg(p)
    p.add_argument("--limit", type=int, default=None, help="use the first N samples")
    p.add_argument("--out", required=True, help="output folder (a new or empty one, or one of --overwrite)")
    add_out_flags(p)
    p.add_argument("--label", default=None, help="name of the model in reports (default: folder name)")
    p.add_argument(
        "--compare",
        nargs="+",
        default=None,
        help="other checkpoints (or saved report folders) to overlay in compare.png / compare.json; models of "
        "any family and depth, placed by relative depth",
    )
    p.add_argument(
        "--compare-depth",
        choices=["attention", "decoder"],
        default="attention",
        help="x axis of the comparison: position among the softmax-attention layers, or decoder depth (they "
        "differ for hybrid decoders such as Qwen3.5's)",
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--vas-layers", type=int, nargs="+", default=None, help="layers to average VAS over (default all)")
    p.add_argument("--heatmaps", type=int, default=0, help="draw image attention maps for the first N samples")
    p.add_argument("--heatmap-layers", type=int, nargs="+", default=[-1], help="layers for the image maps")
    p.add_argument(
        "--heatmap-queries",
        choices=["user", "response"],
        default="user",
        help="whose attention the image maps show: the user's question, or the response (the sample's, else greedy)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="response length for --heatmap-queries response")
    p.add_argument("--no-progress", action="store_true")
    add_intervention_args(p)
    p.set_defaults(run_command=run)


def run(args) -> int:
    import avar_ops.analysis as analysis

    out = check_out(args.out)
    samples = load_data(args.data, args.limit, args.data_format)
    check_batches(samples, args.batch_size)
    iv = intervention_from_flags(args)
    shape = loading.model_shape(args.model)
    check_selection(args, [iv], shape)
    check_device(args, shape)
    drawn = [s for s in samples[: args.heatmaps] if s["images"]]
    try:
        heatmap_names = unique_safe_names([s["id"] for s in drawn], "--heatmaps: sample ids")
    except ValueError as exc:
        raise DataError(str(exc)) from None
    compares = _compare_sources(args.compare or [], args)

    # Every check passed: take the folder (the policy may remove an old run with --overwrite) and measure.
    with open_out(args, "vas") as run_folder:
        model, processor, report, paths = _measure(args.model, args, samples, out, label=args.label, intervention=iv)
        print(report.summary())
        for sample, name in zip(drawn, heatmap_names):
            res = analysis.image_attention(
                model,
                processor,
                sample,
                layers=args.heatmap_layers,
                queries=args.heatmap_queries,
                intervention=iv,
                max_new_tokens=args.max_new_tokens,
            )
            for p in analysis.save_overlays(res, sample, out, prefix=f"attention_sample{name}"):
                paths[f"heatmap_{name}_{os.path.basename(p)}"] = p
        reports = [report]
        for kind, value, folder in compares:
            if kind == "report":
                reports.append(value)
            else:
                reports.append(_measure(value, args, samples, inside(out, "compare", folder))[2])
            print(reports[-1].summary())
        if len(reports) > 1:
            paths["compare_json"] = inside(out, "compare.json")
            paths["compare"] = analysis.compare(
                reports, inside(out, "compare.png"), depth=args.compare_depth, json_path=paths["compare_json"]
            )
        for name, p in paths.items():
            print(f"  {name}: {p}")
        run_folder.finish()
    return 0


def _compare_sources(specs: Sequence[str], args) -> list:
    """Each --compare entry as ("report", VASReport, None) or ("model", path, folder under out/compare), checked
    (reports read, checkpoint configs read) before any model loads."""
    import avar_ops.analysis as analysis

    sources, folders = [], set()
    for spec in specs:
        report_file = spec if os.path.isfile(spec) and spec.endswith(".json") else os.path.join(spec, "vas.json")
        if os.path.isfile(report_file):
            try:
                sources.append(("report", analysis.VASReport.load(report_file), None))
            except (OSError, ValueError) as exc:
                raise DataError(f"--compare: {exc}") from None
            continue
        shape = loading.model_shape(spec, "--compare")
        check_selection(args, [None], shape)
        check_device(args, shape)
        folder = base = safe_name(os.path.basename(os.path.normpath(spec)), default="model")
        n = 1
        while folder in folders:  # two checkpoints in folders of the same name: their reports must not collide
            n += 1
            folder = f"{base}_{n}"
        folders.add(folder)
        sources.append(("model", spec, folder))
    return sources


def _measure(spec: str, args, samples, folder: str, *, label=None, intervention=None):
    """Load the model of `spec`, measure VAS over the samples and save the report in `folder`: (model,
    processor, report, {name: path of each file written})."""
    import avar_ops.analysis as analysis

    model, processor, name = loading.load_model(spec, dtype=args.dtype, device=args.device)
    report = analysis.measure(
        model,
        processor,
        samples,
        layers=args.vas_layers,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        label=label or name,
        intervention=intervention,
    )
    return model, processor, report, report.save(folder)
