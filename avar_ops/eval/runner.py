"""`avar eval`'s engine: batched generation under the patch, VAS from the same generation's prefill, scoring by
each benchmark's own rule (`avar_ops.grading.score`, official or strict), resumable per-sample JSONL, and the
report in the paper's table layout.

Run folder layout (every name fixed here; nothing derived from the data becomes a path):

    RUN/config.json              settings of the run (a rerun must match them to continue)
    RUN/samples/<benchmark>.jsonl one record per answered sample, appended as batches finish
    RUN/report.json, report.md   per-benchmark accuracy and VAS, and the average
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from avar_ops.core import GROUP_NAMES
from avar_ops.data import build_inputs
from avar_ops.eval.benchmarks import PAPER_ORDER, REASONING_BUDGET, Benchmark, Sample, ids_digest
from avar_ops.eval.judge import JUDGED
from avar_ops.grading import MODES, LatexChecker, ScoreResult, score
from avar_ops.hf import collect_masses, token_groups
from avar_ops.method import generate, intervened
from avar_ops.method import vas as vas_metric

CONFIG_FILE, REPORT_JSON, REPORT_MD, SAMPLES_DIR = "config.json", "report.json", "report.md", "samples"
RULE_BASED = "rule-based"


class RunConflictError(ValueError):
    """The output folder holds a run made with other settings."""


@dataclass
class EvalSettings:
    """Everything that moves the numbers; written to config.json and into every report."""

    checkpoint: str
    label: str
    benchmarks: Dict[str, dict]  # name -> {"path", "split", "prompt_template", "options", "max_new_tokens", …}
    max_new_tokens: Optional[int]  # None: each benchmark's harness default (benchmarks[name]["max_new_tokens"])
    batch_size: int
    limit: Optional[int]
    seed: int
    system_prompt: Optional[str]
    intervention: Optional[dict]
    extraction: str = RULE_BASED
    decoding: str = "greedy"
    dtype: str = "auto"
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    versions: Dict[str, str] = field(default_factory=dict)
    effective_pixels: Optional[dict] = None  # the image processor's min/max_pixels, known once it is loaded
    sample: Optional[int] = None  # a seeded subset of N per benchmark (benchmarks.sample_subset)
    sample_seed: int = 0
    judge_url: Optional[str] = None
    scoring: str = "official"  # the scorers' mode (avar_ops.grading.MODES): official rule, or strict
    template_system: bool = True  # the chat template renders a system turn when no system prompt is given

    # settings that may differ between a run and its continuation (they change no answer; records are per id, and
    # a larger --sample keeps the smaller one's questions); each record keeps the batch size it was answered with
    RESUMABLE = ("batch_size", "limit", "sample", "versions", "effective_pixels", "judge_url", "template_system")

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def versions() -> Dict[str, str]:
    from importlib import metadata

    import transformers

    try:
        avar = metadata.version("avar")
    except metadata.PackageNotFoundError:  # a source checkout that was built in place, not installed
        avar = "source"
    return {
        "avar": avar,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def prepare_run_folder(out: str, settings: EvalSettings) -> None:
    """Create the run folder, or check that an existing one holds a run with the same settings."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunConflictError("--out: %s exists and is not a folder" % out)
    config_path = os.path.join(out, CONFIG_FILE)
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            previous = json.load(f)
        mine = json.loads(json.dumps(settings.to_dict()))
        changed = sorted(
            k for k in set(previous) | set(mine) if k not in EvalSettings.RESUMABLE and previous.get(k) != mine.get(k)
        )
        if changed:
            raise RunConflictError(
                "--out: %s holds a run with other settings (%s); use a new folder to start another run"
                % (out, ", ".join(changed))
            )
    os.makedirs(os.path.join(out, SAMPLES_DIR), exist_ok=True)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(settings.to_dict(), f, indent=1)


def read_records(path: str) -> Dict[str, dict]:
    """Records already written (id -> record). A last line cut short by an interruption is dropped and the file
    truncated to the last complete record, so that appending continues cleanly."""
    records: Dict[str, dict] = {}
    if not os.path.isfile(path):
        return records
    good_end = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            records[record["id"]] = record
            good_end += len(line)
    if good_end != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


class _FirstStepUserRows:
    """collect_masses reduction for generate: keep the user-token rows of the prefill (the first forward,
    whose queries span the whole prompt) and drop the decode steps' one-row masses."""

    def __init__(self, columns: torch.Tensor, prompt_len: int):
        self.columns = columns  # int64 [L']
        self.prompt_len = prompt_len

    def __call__(self, mass: torch.Tensor):  # [B, H, Lq, G] -> [B, H, L', G] for the prefill, else None
        if mass.shape[2] != self.prompt_len:
            return None
        return mass.detach().index_select(2, self.columns).float().cpu()


def _sample_dict(sample: Sample, system_prompt: Optional[str]) -> dict:
    return {
        "id": sample.id,
        "images": [im.load() for im in sample.images],
        "question": sample.prompt,
        "system": system_prompt,
        "response": None,
    }


def _batches(samples: Sequence[Sample], batch_size: int) -> List[List[Sample]]:
    """Consecutive samples, `batch_size` at a time, never mixing samples with and without images."""
    out: List[List[Sample]] = []
    for s in samples:
        if out and len(out[-1]) < batch_size and bool(out[-1][0].images) == bool(s.images):
            out[-1].append(s)
        else:
            out.append([s])
    return out


def _prefill_statistics(masses: List[torch.Tensor], user: torch.Tensor, has_image: List[bool]) -> List[dict]:
    """Per sample: VAS (the paper's mean of ratios; None without an image or when undefined) and the split of
    the user tokens' attention over the token groups (mean over layers, heads and user tokens)."""
    query = user.cpu()  # [B, L']
    stacked = torch.stack(masses).to(torch.float64)  # [NL, B, H, L', G]
    qw = query.to(torch.float64)  # [B, L']
    n_query = qw.sum(-1).clamp(min=1)  # [B]
    split = (stacked * qw[None, :, None, :, None]).sum(3).mean(2).mean(0) / n_query[:, None]  # [B, G]
    try:
        result = vas_metric(masses, query, empty="skip") if bool(query.any()) else None
    except ValueError:  # no sample of the batch has a defined VAS
        result = None
    out = []
    for b in range(len(has_image)):
        defined = result is not None and bool(result.valid[b]) and has_image[b]
        out.append(
            {
                "vas": float(result.vas.per_sample[b]) if defined else None,
                "split": {g: float(split[b, i]) for i, g in enumerate(GROUP_NAMES)} if bool(query[b].any()) else None,
            }
        )
    return out


def evaluate_benchmark(
    model,
    processor,
    benchmark: Benchmark,
    samples: Sequence[Sample],
    records_path: str,
    *,
    intervention=None,
    system_prompt: Optional[str] = None,
    max_new_tokens: int = 512,
    batch_size: int = 1,
    scoring: str = "official",
    latex: Optional[LatexChecker] = None,
    judge=None,
    progress: bool = True,
) -> List[dict]:
    """Answer, score and measure every sample not yet in `records_path`; returns all records in sample order.
    Each answer is scored by its benchmark's rule in mode `scoring` (official or strict); `latex` checks the
    symbolic answers (a default checker when None)."""
    if scoring not in MODES:
        raise ValueError("scoring: expected one of %s, got %r" % (", ".join(MODES), scoring))
    done = read_records(records_path)
    todo = [s for s in samples if s.id not in done]
    device = next(model.parameters()).device
    bar = _progress(len(samples), len(samples) - len(todo), progress, benchmark.title)
    with intervened(model, processor, intervention), open(records_path, "a", encoding="utf-8") as out:
        for batch in _batches(todo, batch_size):
            inputs = build_inputs(processor, [_sample_dict(s, system_prompt) for s in batch], device=device)
            groups = token_groups(inputs["input_ids"], processor, inputs.get("attention_mask"))
            user = groups.user_mask  # [B, L]
            columns = torch.nonzero(user.any(0)).flatten()  # [L']
            reduce = _FirstStepUserRows(columns.to(user.device), inputs["input_ids"].shape[1])
            with collect_masses(model, reduce=reduce) as rec:
                rows = generate(model, processor, inputs, max_new_tokens=max_new_tokens)
            masses = rec.steps[0]  # the prefill: one [B, H, L', G] per layer
            stats = _prefill_statistics(masses, user.index_select(1, columns), [bool(s.images) for s in batch])
            responses = [processor.tokenizer.decode(t, skip_special_tokens=True) for t in rows]
            judged = None
            if judge is not None and judge.covers(benchmark.name):
                checks, judged = judge.check(benchmark.name, batch, responses, scoring, latex)
            else:
                checks = [score(benchmark.name, r, s.fields, scoring, latex) for s, r in zip(batch, responses)]
            for i, (s, tokens, check, stat) in enumerate(zip(batch, rows, checks, stats)):
                record = {
                    "id": s.id,
                    "response": responses[i],
                    "generated_tokens": len(tokens),
                    "extracted": check.extracted,
                    "rule": check.rule,
                    "mode": check.mode,
                    "flagged": check.flagged,
                    "status": check.status,
                    "detail": check.detail,
                    "gold": s.answer.gold,
                    "vas": stat["vas"],
                    "split": stat["split"],
                    "fields": s.fields,
                    "batch_size": batch_size,
                    "max_new_tokens": max_new_tokens,
                }
                if judged is not None:
                    record["judge_output"] = judged[i]
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                done[s.id] = record
            out.flush()
            bar.update(len(batch))
    bar.close()
    return [done[s.id] for s in samples]


def _result_of(record: dict) -> ScoreResult:
    return ScoreResult(
        record["status"] == "correct",
        record.get("extracted"),
        record.get("rule", ""),
        record.get("mode", ""),
        bool(record.get("flagged", False)),
        record["status"],
        record.get("detail", ""),
    )


def benchmark_row(benchmark: Benchmark, samples: Sequence[Sample], records: Sequence[dict]) -> dict:
    """Scores (accuracy and the benchmark's own, e.g. HallusionBench's three, MMMU-Pro's settings), the
    per-category tables, VAS and the attention split, and how the records were made (batch sizes, limits)."""
    results = [_result_of(r) for r in records]
    row = dict(benchmark.score(samples, results))
    row["by"] = benchmark.breakdown_tables(samples, results)
    vas_values = [r["vas"] for r in records if r.get("vas") is not None]
    splits = [r["split"] for r in records if r.get("split") is not None]
    row["vas"] = float(np.mean(vas_values)) if vas_values else None
    row["n_vas"] = len(vas_values)
    row["split"] = {g: float(np.mean([s[g] for s in splits])) for g in GROUP_NAMES} if splits else None
    row["extraction_methods"] = _counts(r.get("rule", "") for r in records)
    # verdicts the official rule reached by a guess or a similarity mapping (MMMU, MathVista, HallusionBench)
    row["n_flagged"] = sum(bool(r.get("flagged")) for r in records)
    row["scoring_modes"] = _counts(str(r.get("mode", "unknown")) for r in records)
    # records written before the batch size was recorded show as "unknown"
    row["batch_sizes"] = _counts(str(r.get("batch_size", "unknown")) for r in records)
    row["max_new_tokens_used"] = _counts(str(r.get("max_new_tokens", "unknown")) for r in records)
    row["ids_sha256"] = ids_digest(samples)
    return _no_nan(row)


def _no_nan(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    return value


def _counts(values) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def write_report(out: str, settings: EvalSettings, rows: Dict[str, dict], titles: Dict[str, str]) -> Dict[str, str]:
    """report.json and report.md (the paper's table: one column per benchmark and the average)."""
    names = [n for n in PAPER_ORDER if n in rows]
    accs = [rows[n]["accuracy"] for n in names]
    vases = [rows[n]["vas"] for n in names]
    average = {
        "accuracy": float(np.mean(accs)) if accs and all(a is not None for a in accs) else None,
        "vas": float(np.mean(vases)) if vases and all(v is not None for v in vases) else None,
        "benchmarks": names,
    }
    report = {"label": settings.label, "settings": settings.to_dict(), "benchmarks": rows, "average": average}
    paths = {"json": os.path.join(out, REPORT_JSON), "markdown": os.path.join(out, REPORT_MD)}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)

    def cell(v, fmt="%.1f"):
        return "–" if v is None else fmt % v

    header = ["Model"] + [titles[n] for n in names] + ["Avg."]
    lines = [
        "# %s" % settings.label,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        "| %s | " % settings.label + " | ".join(cell(a) for a in accs) + " | %s |" % cell(average["accuracy"]),
        "| VAS | " + " | ".join(cell(v, "%.2f") for v in vases) + " | %s |" % cell(average["vas"], "%.2f"),
        "",
    ]
    lines += [
        "| benchmark | samples | scored | correct | flagged | timeouts | checker errors | VAS samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = rows[n]
        lines.append(
            "| %s | %d | %d | %d | %d | %d | %d | %d |"
            % (
                titles[n],
                r["n"],
                r["n_scored"],
                r["n_correct"],
                r.get("n_flagged", 0),
                r["n_timeout"],
                r["n_error"],
                r["n_vas"],
            )
        )
    lines += [
        "",
        "Attention of the user tokens (mean over layers, heads and tokens):",
        "",
        "| benchmark | visual | system | user | other |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        split = rows[n]["split"] or {}
        lines.append(
            "| %s | %s |"
            % (titles[n], " | ".join(cell(split.get(g), "%.3f") for g in ("visual", "system", "user", "other")))
        )
    lines += _protocol_lines(settings, rows, titles, names, cell)
    lines += _category_lines(rows, titles, names, cell)
    iv = settings.intervention
    lines += [
        "",
        "Accuracy is over the answers that were checked; timeouts and checker errors are counted, not scored.",
        "",
        "- scoring: %s (%s); flagged: verdicts the official rule reached by a guess or a similarity mapping "
        "(MMMU's random pick, MathVista's most similar choice, HallusionBench's hedged unclear answer)"
        % (
            settings.scoring,
            "each benchmark's official rule"
            if settings.scoring == "official"
            else "the official rules without their guesses and similarity mappings",
        ),
        "- checkpoint: `%s`" % settings.checkpoint,
        "- intervention: %s" % (json.dumps(iv) if iv else "none"),
        "- answer extraction: %s" % settings.extraction
        + (
            " at %s (the judge scores %s, whose official scoring uses a model; the others are rule-based)"
            % (settings.judge_url, ", ".join(JUDGED))
            if settings.extraction != RULE_BASED
            else ""
        ),
        "- decoding: %s, max_new_tokens %s, seed %d"
        % (
            settings.decoding,
            settings.max_new_tokens if settings.max_new_tokens is not None else "per benchmark (see the protocol)",
            settings.seed,
        ),
        "- min_pixels / max_pixels: %s"
        % (settings.effective_pixels or {"min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels}),
        "- system prompt: %s"
        % (
            json.dumps(settings.system_prompt)
            if settings.system_prompt is not None
            else "the chat template's default"
            if settings.template_system
            else "none (the chat template adds none): VAS, a ratio to system attention, is undefined; pass --system"
        ),
        "- limit: %s" % (("the first %d samples" % settings.limit) if settings.limit else "none"),
        "- sample: %s"
        % (
            (
                "a seeded subset of %d per benchmark (seed %d; ids_sha256 in report.json)"
                % (settings.sample, settings.sample_seed)
            )
            if settings.sample
            else "none"
        ),
        "- prompt templates: see report.json (settings.benchmarks)",
    ]
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return paths


def _protocol_lines(settings: EvalSettings, rows, titles, names, cell) -> List[str]:
    """Per benchmark: split, prompt options, generation limit (flagged where it may cut a reasoning model's
    answer), the batch sizes the records were answered with; MMMU-Pro's settings and HallusionBench's scores."""
    lines = [
        "",
        "Protocol:",
        "",
        "| benchmark | split | options | max_new_tokens | batch sizes | samples |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for n in names:
        b = settings.benchmarks.get(n, {})
        limit = b.get("max_new_tokens")
        flag = ""
        if isinstance(limit, int) and limit < REASONING_BUDGET:
            flag = " (!)"
            notes.append(n)
        opts = ", ".join("%s=%s" % kv for kv in sorted((b.get("options") or {}).items())) or "–"
        sizes = ", ".join("%s×%d" % kv for kv in sorted(rows[n].get("batch_sizes", {}).items()))
        lines.append(
            "| %s | %s | %s | %s%s | %s | %d |"
            % (titles[n], b.get("split", "?"), opts, limit, flag, sizes, rows[n]["n"])
        )
    if notes:
        harness = [
            n for n in notes if settings.benchmarks.get(n, {}).get("max_new_tokens_source") != "--max-new-tokens"
        ]
        lines += [
            "",
            "(!) under %d new tokens (%s): a reasoning model's step-by-step answer may be cut before its final answer."
            % (REASONING_BUDGET, ", ".join(titles[n] for n in notes))
            + (
                " %s: the reference harness's limit; --max-new-tokens raises it (the run then departs from the "
                "harness's protocol)." % ", ".join(titles[n] for n in harness)
                if harness
                else ""
            ),
        ]
    if any(len(rows[n].get("batch_sizes", {})) > 1 for n in names):
        lines += ["", "Records of one benchmark were answered with different batch sizes (a resumed run)."]
    if "mmmu_pro" in rows and rows["mmmu_pro"].get("settings"):
        r = rows["mmmu_pro"]
        lines += [
            "",
            "MMMU-Pro settings: "
            + ", ".join("%s %s" % (k, cell(v.get("accuracy"))) for k, v in sorted(r["settings"].items()))
            + " (the table shows the %s)." % r.get("accuracy_rule", "accuracy"),
        ]
    if "hallusionbench" in rows:
        h = rows["hallusionbench"]
        lines += [
            "",
            "HallusionBench: aAcc %s, fAcc %s, qAcc %s (the table shows aAcc)."
            % (cell(h.get("aAcc")), cell(h.get("fAcc")), cell(h.get("qAcc"))),
        ]
    return lines


def _category_lines(rows, titles, names, cell) -> List[str]:
    lines = []
    for n in names:
        for field_name, table in (rows[n].get("by") or {}).items():
            lines += [
                "",
                "%s by %s:" % (titles[n], field_name),
                "",
                "| %s | samples | scored | accuracy |" % field_name,
                "|---|---|---|---|",
            ]
            for value, r in table.items():
                lines.append("| %s | %d | %d | %s |" % (_md_cell(value), r["n"], r["n_scored"], cell(r["accuracy"])))
    return lines


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, enabled: bool, label: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit="sample")
