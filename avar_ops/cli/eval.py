"""`avar eval` and `avar correlate`: accuracy and VAS on the paper's benchmarks, and their correlation across runs.

    avar eval --model DIR|tiny --bench mathvista=PATH mmstar=PATH … [--intervention-flags] [--limit N | --sample N]
              [--batch-size B] [--max-new-tokens T] [--mathverse-prompt F] [--hallusion-instruction I] --out RUN
    avar correlate RUN_DIR RUN_DIR RUN_DIR … --out DIR

Arguments, benchmark files and the output folder are checked before a model is loaded; a bad one is reported
in one line on stderr (exit 2 for usage, 1 for unreadable data).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import List, Optional, Tuple

from avar_ops.cli import loading
from avar_ops.cli.args import (
    add_intervention_args,
    add_model_args,
    check_device,
    check_selection,
    intervention_from_flags,
)
from avar_ops.cli.errors import CLIError, DataError, Interrupted
from avar_ops.cli.out import add_out_flags, open_out, prepare_out
from avar_ops.data import TextError, check_messages, check_text
from avar_ops.eval import (
    BENCHMARKS,
    GENERATION_SOURCES,
    PAPER_ORDER,
    BenchmarkDataError,
    JudgeError,
    get_benchmark,
)
from avar_ops.hf import render_chat

__all__ = ["add_parser"]


def _bench_specs(tokens: List[str]) -> List[Tuple[str, Optional[str], str]]:
    """NAME[:SPLIT]=PATH tokens -> (benchmark name, split or None, path), in the paper's order."""
    specs = {}
    for token in tokens:
        key, sep, path = token.partition("=")
        if not sep or not key or not path:
            raise CLIError("--bench: expected NAME=PATH or NAME:SPLIT=PATH, got %r" % token)
        name, _, split = key.partition(":")
        try:
            bench = get_benchmark(name)
        except ValueError as exc:
            raise CLIError("--bench: %s" % exc) from exc
        if split and split not in bench.files:
            raise CLIError(
                "--bench: %s has no split %r (expected one of %s)" % (bench.name, split, ", ".join(sorted(bench.files)))
            )
        if bench.name in specs:
            raise CLIError("--bench: %s given twice" % bench.name)
        specs[bench.name] = (bench.name, split or None, path)
    return [specs[n] for n in PAPER_ORDER if n in specs]


# torch.manual_seed takes seeds up to 2**64 - 1.
MAX_SEED = 2**64 - 1


def _template_adds_system(spec) -> bool:
    """Whether the model's chat template renders a system turn for a conversation that has none (Qwen2.5-VL's
    does; Qwen3-VL's and Qwen3.5's do not, and VAS is then undefined unless --system gives one)."""
    from avar_ops.hf import token_groups

    processor = loading.load_processor(spec)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], add_generation_prompt=True, tokenize=False
    )
    ids = processor.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]  # [1, n]
    added = bool(token_groups(ids, processor).system_mask.any())
    if not added:
        print(
            "avar eval: note: the chat template adds no system prompt, so VAS (a ratio to system attention) is "
            "undefined for every sample; pass --system TEXT to measure it",
            file=sys.stderr,
        )
    return added


def _check_prompt_lengths(args, specs, loaded, limits) -> None:
    """Every prompt's text, rendered by the chat template, tokenized and measured against the model's context with
    room for its benchmark's generation limit (`limits`), before the model loads (image tokens come on top of the
    count)."""
    context = loading.context_length(args.model)
    processor = loading.load_processor(args.model)
    tokenizer = processor.tokenizer
    for name, _, _ in specs:
        for sample in loaded[name]:
            messages = (
                [] if args.system is None else [{"role": "system", "content": [{"type": "text", "text": args.system}]}]
            )
            content = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sample.prompt}]
            messages.append({"role": "user", "content": content})
            try:  # the family's own special tokens (`<image>`, `<img>`, …), typed in a question or --system
                check_messages(messages, where=f"{name} sample {sample.id!r}", tokenizer=processor)
            except TextError as exc:
                raise DataError(str(exc)) from None
            text = render_chat(processor, messages, add_generation_prompt=True)
            n = len(tokenizer(text, verbose=False)["input_ids"])
            if n + limits[name] > context:
                limit = ("--max-new-tokens is %d" if args.max_new_tokens else "the generation limit is %d") % limits[
                    name
                ]
                raise DataError(
                    "%s sample %r: the prompt is %d tokens without its images and %s; the model's context holds %d"
                    % (name, sample.id, n, limit, context)
                )


def add_parser(sub) -> None:
    """Add `eval` and `correlate` to the `avar` subparsers; each sets `run_command` (args -> exit code)."""
    p = eval_parser = sub.add_parser(
        "eval", help="accuracy and VAS on the paper's benchmarks, from local parquet files"
    )
    add_model_args(p)
    p.add_argument(
        "--bench",
        nargs="+",
        required=True,
        metavar="NAME[:SPLIT]=PATH",
        help="benchmark files or folders; names: %s" % ", ".join(PAPER_ORDER),
    )
    p.add_argument("--out", required=True, help="run folder (--resume continues a run with the same settings)")
    add_out_flags(p, resume=True)
    p.add_argument("--label", default=None, help="name of the run in tables and plots (default: the model's)")
    p.add_argument("--limit", type=int, default=None, help="the first N samples of each benchmark")
    p.add_argument(
        "--sample",
        type=int,
        default=None,
        metavar="N",
        help="a fixed, seeded subset of N samples per benchmark (the same ids for every model; e.g. 200 for "
        "MathVista as the paper's VAS protocol)",
    )
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the --sample subset")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generation limit for every benchmark (default: each benchmark's reference harness limit, "
        "e.g. 128 for MMMU and HallusionBench as in lmms-eval; recorded in the report)",
    )
    p.add_argument(
        "--mathverse-prompt",
        choices=BENCHMARKS["mathverse"].options["prompt_field"].choices,
        default=BENCHMARKS["mathverse"].options["prompt_field"].default,
        help=BENCHMARKS["mathverse"].options["prompt_field"].help,
    )
    p.add_argument(
        "--hallusion-instruction",
        choices=BENCHMARKS["hallusionbench"].options["instruction"].choices,
        default=BENCHMARKS["hallusionbench"].options["instruction"].default,
        help=BENCHMARKS["hallusionbench"].options["instruction"].help,
    )
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    p.add_argument("--min-pixels", type=int, default=None, help="image processor min_pixels (default: the model's)")
    p.add_argument("--max-pixels", type=int, default=None, help="image processor max_pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--judge-url",
        default=None,
        help="OpenAI-compatible endpoint (e.g. http://localhost:8000/v1) of a judge that extracts "
        "answers; default: rule-based extraction",
    )
    p.add_argument("--judge-model", default=None, help="model name at --judge-url")
    p.add_argument(
        "--judge-retries", type=int, default=4, help="retries of a failed judge request (with backoff) before giving up"
    )
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's key")
    p.add_argument(
        "--scoring",
        choices=("official", "strict"),
        default="official",
        help="each benchmark's official rule (default), or strict: the same rules without MMMU's random guess, "
        "MathVista's most-similar-choice mapping and integer truncation, MMMU's substring match on open "
        "questions and HallusionBench's hedged unclear answer (see README, Scoring)",
    )
    p.add_argument("--checker-timeout", type=float, default=5.0, help="seconds per LaTeX answer check")
    p.add_argument("--no-progress", action="store_true")
    add_intervention_args(p)

    p = sub.add_parser("correlate", help="accuracy against VAS across `avar eval` runs: Pearson r, Spearman, plot")
    p.add_argument("runs", nargs="+", help="run folders written by `avar eval` (at least 3)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the interval on r")
    eval_parser.set_defaults(run_command=_cmd_eval)
    p.set_defaults(run_command=_cmd_correlate)


def _cmd_eval(args) -> int:
    from avar_ops.eval import runner

    try:
        check_text(args.system, where="the command line", field="--system")
    except TextError as exc:
        raise CLIError(str(exc)) from None
    specs = _bench_specs(args.bench)
    prepare_out(args.out, args.command, create=False)
    for module, package in (("math_verify", "math-verify"), ("pyarrow", "pyarrow")):
        if importlib.util.find_spec(module) is None:
            raise CLIError("%s is needed to read benchmarks and check answers: pip install 'avar[eval]'" % package)
    if (args.judge_url is None) != (args.judge_model is None):
        raise CLIError("--judge-url and --judge-model go together")
    if args.judge_retries < 0:
        raise CLIError("--judge-retries: expected a number >= 0, got %d" % args.judge_retries)
    for flag in ("min_pixels", "max_pixels"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise CLIError("--%s: expected a positive number, got %d" % (flag.replace("_", "-"), getattr(args, flag)))
    if args.min_pixels is not None and args.max_pixels is not None and args.min_pixels > args.max_pixels:
        raise CLIError("--min-pixels (%d) must not exceed --max-pixels (%d)" % (args.min_pixels, args.max_pixels))
    if not 0 <= args.seed <= MAX_SEED:
        raise CLIError("--seed: expected an integer in [0, 2**64 - 1], got %d" % args.seed)
    for flag in ("limit", "sample", "batch_size", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise CLIError("--%s: expected a positive number, got %d" % (flag.replace("_", "-"), value))
    if args.limit is not None and args.sample is not None:
        raise CLIError("--limit and --sample: give one (the first N samples, or a seeded subset of N)")
    if not args.checker_timeout > 0:
        raise CLIError("--checker-timeout: expected seconds > 0, got %g" % args.checker_timeout)
    iv = intervention_from_flags(args)
    shape = loading.model_shape(args.model)
    check_selection(args, [iv], shape)
    check_device(args, shape)
    judge = None
    if args.judge_url is not None:
        from avar_ops.eval import Judge
        from avar_ops.grading import ChatClient, ChatClientError

        try:
            client = ChatClient(
                args.judge_url,
                args.judge_model,
                api_key=os.environ.get(args.judge_key_env),
                max_retries=args.judge_retries,
            )
            client.check_reachable()
        except ValueError as exc:
            raise CLIError("--judge-url / --judge-model: %s" % exc) from exc
        except ChatClientError as exc:
            raise CLIError("--judge-url: %s; start the judge server or leave --judge-url out" % exc) from None
        judge = Judge(client, cache_dir=os.path.join(args.out, "judge"))

    options = {
        "mathverse": {"prompt_field": args.mathverse_prompt},
        "hallusionbench": {"instruction": args.hallusion_instruction},
    }
    loaded = {}
    for name, split, path in specs:
        try:
            loaded[name] = BENCHMARKS[name].load(
                path,
                split=split,
                limit=args.limit,
                sample=args.sample,
                sample_seed=args.sample_seed,
                options=options.get(name),
            )
        except BenchmarkDataError as exc:
            raise DataError(str(exc)) from exc
    limits = {name: args.max_new_tokens or BENCHMARKS[name].max_new_tokens for name, _, _ in specs}
    _check_prompt_lengths(args, specs, loaded, limits)
    settings = runner.EvalSettings(
        checkpoint=args.model if str(args.model).startswith("tiny") else os.path.abspath(args.model),
        label=args.label
        or (args.model if str(args.model).startswith("tiny") else os.path.basename(os.path.normpath(args.model))),
        benchmarks={
            name: {
                "path": os.path.abspath(path),
                "split": split or BENCHMARKS[name].default_split,
                "prompt_template": BENCHMARKS[name].prompt_template,
                "options": BENCHMARKS[name].resolve_options(options.get(name)),
                "max_new_tokens": limits[name],
                "max_new_tokens_source": "--max-new-tokens" if args.max_new_tokens else GENERATION_SOURCES[name],
            }
            for name, split, path in specs
        },
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        limit=args.limit,
        sample=args.sample,
        sample_seed=args.sample_seed,
        seed=args.seed,
        system_prompt=args.system,
        template_system=args.system is not None or _template_adds_system(args.model),
        intervention=iv.to_dict() if iv is not None else None,
        extraction=judge.mode if judge is not None else runner.RULE_BASED,
        judge_url=judge.client.url if judge is not None else None,
        scoring=args.scoring,
        dtype=args.dtype,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        versions=runner.versions(),
    )
    with open_out(args, "eval", settings.to_dict(), resumable=runner.EvalSettings.RESUMABLE) as folder:
        try:
            runner.prepare_run_folder(args.out, settings)
        except runner.RunConflictError as exc:
            raise CLIError(str(exc)) from exc
        try:
            code = _evaluate(args, specs, loaded, settings, iv, judge)
        except KeyboardInterrupt:
            done = sum(
                len(runner.read_records(os.path.join(args.out, runner.SAMPLES_DIR, name + ".jsonl")))
                for name, _, _ in specs
            )
            total = sum(len(loaded[name]) for name, _, _ in specs)
            raise Interrupted(
                "interrupted at sample %d of %d (every answered sample is saved); rerun the same command with "
                "--resume to resume" % (done, total)
            ) from None
        folder.finish()
    return code


def _evaluate(args, specs, loaded, settings, iv, judge) -> int:
    import torch

    from avar_ops.eval import runner

    if judge is not None:
        try:
            judge.ping()
        except JudgeError as exc:
            raise DataError("%s (checked before loading the model)" % exc) from None
    model, processor, _ = loading.load_model(args.model, dtype=args.dtype, device=args.device)
    image_processor = processor.image_processor
    for flag in ("min_pixels", "max_pixels"):
        if getattr(args, flag) is not None:
            setattr(image_processor, flag, getattr(args, flag))
            if isinstance(getattr(image_processor, "size", None), dict):
                image_processor.size["shortest_edge" if flag == "min_pixels" else "longest_edge"] = getattr(args, flag)
    torch.manual_seed(args.seed)
    rows = {}
    limits = {name: settings.benchmarks[name]["max_new_tokens"] for name, _, _ in specs}
    try:
        _run_benchmarks(args, specs, loaded, limits, model, processor, iv, judge, rows)
    except JudgeError as exc:
        raise DataError(
            "%s; the answers so far are kept: rerun the same command with --resume to continue" % exc
        ) from None
    size = getattr(image_processor, "size", None) or {}
    settings.effective_pixels = {
        "min_pixels": getattr(image_processor, "min_pixels", None) or size.get("shortest_edge"),
        "max_pixels": getattr(image_processor, "max_pixels", None) or size.get("longest_edge"),
    }
    paths = runner.write_report(args.out, settings, rows, {n: BENCHMARKS[n].title for n in rows})
    with open(paths["markdown"], encoding="utf-8") as f:
        print(f.read())
    for kind, path in paths.items():
        print("  %s: %s" % (kind, path))
    return 0


def _run_benchmarks(args, specs, loaded, limits, model, processor, iv, judge, rows) -> None:
    from avar_ops.eval import runner
    from avar_ops.grading import LatexChecker

    with LatexChecker(timeout=args.checker_timeout) as latex:
        for name, _, _ in specs:
            bench = BENCHMARKS[name]
            records = runner.evaluate_benchmark(
                model,
                processor,
                bench,
                loaded[name],
                os.path.join(args.out, runner.SAMPLES_DIR, name + ".jsonl"),
                intervention=iv,
                system_prompt=args.system,
                max_new_tokens=limits[name],
                batch_size=args.batch_size,
                scoring=args.scoring,
                latex=latex,
                judge=judge,
                progress=not args.no_progress,
            )
            rows[name] = runner.benchmark_row(bench, loaded[name], records)


def _cmd_correlate(args) -> int:
    from avar_ops.eval import correlate

    if not 0 < args.confidence < 1:
        raise CLIError("--confidence: expected a value in (0, 1), got %g" % args.confidence)
    if len(args.runs) < 3:
        raise CLIError("runs: a correlation needs at least 3 run folders, got %d" % len(args.runs))
    prepare_out(args.out, args.command, create=False)
    runs = []
    for run_dir in args.runs:
        try:
            runs.append(correlate.load_run(run_dir))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(str(exc)) from exc
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise DataError("runs: labels must differ to tell the points apart, got %s (set --label in avar eval)" % labels)
    try:
        result = correlate.correlate_runs(runs, confidence=args.confidence)
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    if not result:
        raise DataError("runs: no benchmark has accuracy and VAS in at least 3 of the runs")
    os.makedirs(args.out, exist_ok=True)
    paths = {"json": os.path.join(args.out, "correlation.json"), "markdown": os.path.join(args.out, "correlation.md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(
            {"runs": [{"label": r.label, "accuracy": r.accuracy, "vas": r.vas} for r in runs], "correlation": result},
            f,
            indent=1,
        )
    table = correlate.markdown_table(result)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("# Accuracy against VAS over %d runs\n\n%s" % (len(runs), table))
    for key in result:
        # benchmark names come from the registry (fixed), the average has its own name: safe file names
        if key == correlate.AVERAGE or key in BENCHMARKS:
            stem = "correlation" if key == correlate.AVERAGE else "correlation_" + key
            paths["plot_" + key] = correlate.scatter_plot(
                runs, result, os.path.join(args.out, stem + ".png"), benchmark=None if key == correlate.AVERAGE else key
            )
    print(table)
    for kind, path in paths.items():
        print("  %s: %s" % (kind, path))
    return 0
