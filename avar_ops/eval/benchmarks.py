"""The seven benchmarks of the paper's table, read from their published Hugging Face parquet releases.

Each benchmark knows its release's file layout and columns, builds the prompt the way its authors do, and says
how its answers are checked (`AnswerSpec`). Each also carries its protocol: the split and prompt settings the
reference harnesses use by default, the generation limit they set, and the fields its per-category tables are
grouped by. Files are given as a local file or folder:

==============  ===========================  =================================================================
name            release                      files (in the folder given)
==============  ===========================  =================================================================
mathvista       AI4Math/MathVista            data/testmini-*.parquet (split testmini; also test)
mathvision      MathLLMs/MathVision          data/test-*.parquet (split test; also testmini)
mathverse       AI4Math/MathVerse            testmini.parquet, Vision Only rows (or the lmms-eval
                                             testmini_vision_only.parquet); split all: the five versions
mmmu            MMMU/MMMU                    <Subject>/validation-*.parquet (split validation; also dev)
mmmu_pro        MMMU/MMMU_Pro                standard (10 options)/, standard (4 options)/ and vision/
                                             test-*.parquet (split all; or one setting)
mmstar          Lin-Chen/MMStar              mmstar.parquet (split val)
hallusionbench  lmms-lab/HallusionBench      data/image-*.parquet (split image: 951 questions); split all
                                             adds data/non_image-*.parquet (1,129)
==============  ===========================  =================================================================
"""

from __future__ import annotations

import ast
import hashlib
import os
import string
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from avar_ops.data import TextError, check_text
from avar_ops.eval.parquet_files import BenchmarkDataError, LazyImage, find_files, read_rows
from avar_ops.grading import MAX_OPTIONS, AnswerSpec, ScoreResult

LETTERS = string.ascii_uppercase


@dataclass
class Sample:
    """One question: the prompt as the benchmark's authors build it, its images and how to check the answer."""

    benchmark: str
    id: str
    prompt: str
    images: List[LazyImage]
    answer: AnswerSpec
    # the release's columns its scorer reads (avar_ops.grading.score: answer, options, …) and the grouping /
    # breakdown fields (category, set_id, …)
    fields: Dict[str, object] = field(default_factory=dict)


# a field holding several values (MathVista's skills) joins them with this; each value gets its own table row
MULTI_SEP = "; "


@dataclass(frozen=True)
class Option:
    """A prompt setting of one benchmark (e.g. MathVerse's prompt field): its default and allowed values."""

    default: str
    choices: Tuple[str, ...]
    help: str


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str  # as in the paper's table
    release: str
    default_split: str
    files: Dict[str, Tuple[str, ...]]  # split -> glob patterns under the folder
    required: Tuple[str, ...]
    optional: Tuple[str, ...]
    build: Callable[[Dict, int, str, Mapping[str, str]], Optional[Sample]]  # row, index, where, options -> sample
    prompt_template: str  # recorded in every report
    first_pattern_only: bool = False  # use only the first pattern that matches (alternative layouts of one file)
    max_new_tokens: int = 1024  # the reference harness's generation limit (see GENERATION_SOURCES)
    breakdown: Tuple[str, ...] = ()  # Sample.fields the per-category tables group by
    multi_valued: Tuple[str, ...] = ()  # of those, fields holding MULTI_SEP-joined values
    options: Dict[str, Option] = field(default_factory=dict)
    settings: Dict[str, Tuple[str, ...]] = field(default_factory=dict)  # split -> the splits it reads, each apart

    def resolve_options(self, given: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        """The benchmark's options with the defaults filled in; an unknown name or value is refused."""
        given = dict(given or {})
        out = {}
        for key in given:
            if key not in self.options:
                raise ValueError(
                    "%s: unknown option %r (expected one of %s)"
                    % (self.name, key, ", ".join(sorted(self.options)) or "none")
                )
        for key, option in self.options.items():
            value = given.get(key, option.default)
            if value not in option.choices:
                raise ValueError(
                    "%s: option %s expected one of %s, got %r" % (self.name, key, ", ".join(option.choices), value)
                )
            out[key] = value
        return out

    def load(
        self,
        path: str,
        split: Optional[str] = None,
        limit: Optional[int] = None,
        sample: Optional[int] = None,
        sample_seed: int = 0,
        options: Optional[Mapping[str, str]] = None,
    ) -> List[Sample]:
        """The samples of `split`; `limit` keeps the first N, `sample` a fixed subset of N (see `sample_subset`)."""
        split = split or self.default_split
        if split not in self.files and split not in self.settings:
            names = sorted(set(self.files) | set(self.settings))
            raise BenchmarkDataError("%s: unknown split %r (expected one of %s)" % (self.name, split, ", ".join(names)))
        for name, value in (("limit", limit), ("sample", sample)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError("%s: expected a positive integer or None, got %r" % (name, value))
        if limit is not None and sample is not None:
            raise ValueError("limit and sample: give one of them (first N, or a seeded subset of N)")
        opts = self.resolve_options(options)
        if split in self.settings and os.path.isfile(path):
            raise BenchmarkDataError(
                "%s (%s split): reads %s from the release's folder, got the file %s (name one setting, e.g. %s:%s=FILE)"
                % (self.name, split, ", ".join(self.settings[split]), path, self.name, self.settings[split][0])
            )
        if split in self.settings:  # a composite split: each setting read apart, ids prefixed with its name
            samples = []
            for setting in self.settings[split]:
                for s in self._read(path, setting, opts):
                    s.id = "%s/%s" % (setting, s.id)
                    s.fields["setting"] = setting
                    samples.append(s)
        else:
            samples = self._read(path, split, opts)
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise BenchmarkDataError("%s: sample ids are not unique in %s" % (self.name, path))
        if limit is not None:
            samples = samples[:limit]
        if sample is not None:
            samples = sample_subset(samples, sample, sample_seed)
        return samples

    def _read(self, path: str, split: str, opts: Mapping[str, str]) -> List[Sample]:
        what = "%s (%s split)" % (self.name, split)
        patterns = self.files[split]
        if self.first_pattern_only:
            patterns = next(((p,) for p in patterns if _matches(path, p)), patterns)
        files = find_files(path, patterns, what)
        rows = read_rows(files, self.required, self.optional, self.name)
        build_opts = dict(opts, split=split)
        samples = []
        for index, row in enumerate(rows):
            sample = self.build(row, index, "%s row %d" % (self.name, index), build_opts)
            if sample is not None:
                try:  # the question goes to the tokenizer as typed: no template markers in it
                    check_text(sample.prompt, where="%s: %s sample %r" % (path, self.name, sample.id), field="question")
                except TextError as exc:
                    raise BenchmarkDataError(str(exc)) from None
                samples.append(sample)
        if not samples:
            raise BenchmarkDataError("%s: no samples of the %s split in %s" % (self.name, split, path))
        return samples

    def verdicts(self, samples: Sequence[Sample], results: Sequence[ScoreResult]) -> List[Optional[bool]]:
        """Per sample: right, wrong, or None when the answer could not be checked (timeout, checker error). The
        benchmark's own rule (HallusionBench's "unclear" without a figure, …) is the scorer's, already applied."""
        return verdicts_of(results)

    def score(self, samples: Sequence[Sample], results: Sequence[ScoreResult]) -> Dict[str, float]:
        verdicts = self.verdicts(samples, results)
        scores = accuracy_of(verdicts, results)
        if self.name == "hallusionbench":
            scores.update(hallusion_scores(samples, results))
        settings = sorted({s.fields["setting"] for s in samples if "setting" in s.fields})
        if settings:
            scores["settings"] = {
                name: accuracy_of(*_select(verdicts, results, [s.fields.get("setting") == name for s in samples]))
                for name in settings
            }
            if self.name == "mmmu_pro":
                scores.update(_mmmu_pro_headline(scores))
        return scores

    def breakdown_tables(self, samples: Sequence[Sample], results: Sequence[ScoreResult]) -> Dict[str, dict]:
        """Per breakdown field: value -> accuracy over the samples with that value (a multi-valued field counts a
        sample under each of its values)."""
        verdicts = self.verdicts(samples, results)
        tables: Dict[str, dict] = {}
        for name in self.breakdown:
            groups: Dict[str, List[int]] = defaultdict(list)
            for i, s in enumerate(samples):
                value = s.fields.get(name, "")
                values = [v for v in value.split(MULTI_SEP) if v] if name in self.multi_valued else [value]
                for v in values or ["(none)"]:
                    groups[v or "(none)"].append(i)
            if not groups:
                continue
            tables[name] = {
                value: accuracy_of([verdicts[i] for i in idx], [results[i] for i in idx])
                for value, idx in sorted(groups.items())
            }
        return tables


def sample_subset(samples: Sequence[Sample], n: int, seed: int = 0) -> List[Sample]:
    """A fixed subset of n samples, in file order: the n whose sha256(seed, benchmark, id) ranks lowest. It
    depends only on the ids (not on the row order or on what else the file holds), and the subset of n is
    contained in the subset of n + 1, so a run can be extended without redoing answered samples."""

    def rank(s: Sample) -> str:
        return hashlib.sha256(("%d\0%s\0%s" % (seed, s.benchmark, s.id)).encode("utf-8")).hexdigest()

    keep = {id(s) for s in sorted(samples, key=rank)[:n]}
    return [s for s in samples if id(s) in keep]


def ids_digest(samples: Sequence[Sample]) -> str:
    """sha256 of the sorted sample ids: two runs with the same digest answered the same questions."""
    return hashlib.sha256("\n".join(sorted(s.id for s in samples)).encode("utf-8")).hexdigest()


def _matches(path: str, pattern: str) -> bool:
    try:
        find_files(path, (pattern,), "")
    except BenchmarkDataError:
        return False
    return True


# --- scoring ----------------------------------------------------------------------------------------------


def accuracy(results: Sequence[ScoreResult]) -> Dict[str, float]:
    """Accuracy over the answers that were checked; timeouts and checker errors are counted apart."""
    return accuracy_of(verdicts_of(results), results)


def verdicts_of(results: Sequence[ScoreResult]) -> List[Optional[bool]]:
    return [r.correct if r.scored else None for r in results]


def accuracy_of(verdicts: Sequence[Optional[bool]], results: Sequence[ScoreResult]) -> Dict[str, float]:
    scored = [v for v in verdicts if v is not None]
    correct = sum(scored)
    return {
        "accuracy": 100.0 * correct / len(scored) if scored else float("nan"),
        "n": len(verdicts),
        "n_scored": len(scored),
        "n_correct": correct,
        "n_timeout": sum(r.status == "timeout" for r in results),
        "n_error": sum(r.status == "error" for r in results),
    }


def _select(verdicts, results, keep):
    return [v for v, k in zip(verdicts, keep) if k], [r for r, k in zip(results, keep) if k]


def _mmmu_pro_headline(scores: Dict) -> Dict[str, float]:
    """MMMU-Pro's overall score is the mean of its standard (10 options) and vision settings (lmms-eval's
    `mmmu_pro` group, tasks/mmmu_pro/mmmu_pro.yaml, runs exactly these two; the 4-option setting is a
    diagnostic). With one of the two missing, the headline is the setting that was read."""
    per = scores["settings"]
    main = [per[k]["accuracy"] for k in ("standard10", "vision") if k in per]
    if not main:
        return {}
    out = {"accuracy": sum(main) / len(main) if all(a == a for a in main) else float("nan")}
    out["accuracy_rule"] = "mean of standard10 and vision" if len(main) == 2 else "one main setting read"
    return out


def hallusion_scores(samples: Sequence[Sample], results: Sequence[ScoreResult]) -> Dict[str, float]:
    """HallusionBench's three accuracies: all questions (aAcc), figures whose every question is right (fAcc),
    and questions right on every figure they are asked about (qAcc). `accuracy` is aAcc.

    fAcc leaves out the VS questions with figure_id 0, which are asked without a figure (lmms-eval
    tasks/hallusion_bench/utils.py, `get_eval_fig`); qAcc keeps them in their question's group
    (`get_eval_pair_all`). An "unclear" answer to such a question counts right by the scorer's rule
    (avar_ops.grading.scorers.score_hallusionbench). A group with a timeout or checker error in it is left
    out of fAcc / qAcc (it cannot be judged).
    """
    verdicts = verdicts_of(results)
    scores = accuracy_of(verdicts, results)
    figures, questions = defaultdict(list), defaultdict(list)
    for sample, verdict in zip(samples, verdicts):
        f = sample.fields
        if not (f["category"] == "VS" and str(f["figure_id"]) == "0"):
            figures[(f["category"], f["subcategory"], f["set_id"], f["figure_id"])].append(verdict)
        questions[(f["category"], f["subcategory"], f["set_id"], f["question_id"])].append(verdict)
    for name, groups in (("fAcc", figures), ("qAcc", questions)):
        judged = [g for g in groups.values() if all(v is not None for v in g)]
        scores[name] = 100.0 * sum(all(g) for g in judged) / len(judged) if judged else float("nan")
        scores["n_" + name] = len(judged)
    scores["aAcc"] = scores["accuracy"]
    return scores


# --- helpers ----------------------------------------------------------------------------------------------


def _text(row: Dict, column: str, where: str, allow_empty: bool = False) -> str:
    value = row.get(column)
    if value is None or (not allow_empty and not str(value).strip()):
        raise BenchmarkDataError("%s: column %r is empty" % (where, column))
    return str(value)


def _image(row: Dict, column: str, where: str) -> LazyImage:
    image = row.get(column)
    if not isinstance(image, LazyImage):
        raise BenchmarkDataError("%s: column %r holds no image" % (where, column))
    return image


def _option_list(value, where: str) -> List[str]:
    """Options stored as a list, or (MMMU, MMMU-Pro) as the text of a Python list."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value) if value.strip() else []
        except (ValueError, SyntaxError) as exc:
            raise BenchmarkDataError("%s: options %r are not a list" % (where, value[:80])) from exc
    if not isinstance(value, (list, tuple)):
        raise BenchmarkDataError("%s: options must be a list, got %s" % (where, type(value).__name__))
    if len(value) > MAX_OPTIONS:
        raise BenchmarkDataError("%s: %d options, at most %d are supported" % (where, len(value), MAX_OPTIONS))
    return [str(v) for v in value]


def _lettered(options: Sequence[str], style: str = "({letter}) {option}") -> str:
    return "\n".join(style.format(letter=LETTERS[i], option=o) for i, o in enumerate(options))


def _letter(answer: str, num_options: int, where: str) -> str:
    answer = answer.strip().strip("()")
    if len(answer) != 1 or answer.upper() not in LETTERS[:num_options]:
        raise BenchmarkDataError("%s: answer %r is not one of the %d option letters" % (where, answer, num_options))
    return answer.upper()


# --- MathVista --------------------------------------------------------------------------------------------


def _mathvista(row: Dict, index: int, where: str, opts: Mapping[str, str]) -> Sample:
    choices = _option_list(row.get("choices"), where)
    answer = _text(row, "answer", where)
    question_type = _text(row, "question_type", where)
    if question_type == "multi_choice":
        if answer not in choices:
            raise BenchmarkDataError("%s: answer %r is not among the choices %r" % (where, answer, choices))
        spec = AnswerSpec(LETTERS[choices.index(answer)], "choice", num_options=len(choices), options=choices)
    elif question_type == "free_form":
        answer_type = _text(row, "answer_type", where)
        if answer_type == "integer":
            spec = AnswerSpec(answer, "number")
        elif answer_type == "float":
            spec = AnswerSpec(answer, "number", precision=_precision(row.get("precision")))
        elif answer_type in ("text", "list"):
            spec = AnswerSpec(answer, "text")
        else:
            raise BenchmarkDataError("%s: unknown answer_type %r" % (where, answer_type))
    else:
        raise BenchmarkDataError("%s: unknown question_type %r" % (where, question_type))
    return Sample(
        "mathvista",
        _text(row, "pid", where),
        _text(row, "query", where),  # the release's own prompt: hint on the answer format, question, choices
        [_image(row, "decoded_image", where)],
        spec,
        {
            "question_type": question_type,
            "answer_type": str(row.get("answer_type")),
            "unit": str(row.get("unit") or ""),
            **_mathvista_meta(row.get("metadata")),
            # scored by score_mathvista: the choice's text is the reference
            "answer": answer,
            "choices": choices,
            "precision": _precision(row.get("precision")),
        },
    )


def _precision(value) -> Optional[int]:
    # the release stores NaN when a float answer has no precision
    return int(value) if value is not None and value == value else None


def _mathvista_meta(meta) -> Dict[str, str]:
    """Task and skills from the release's `metadata` struct (skills is a list: each skill gets a table row)."""
    if not isinstance(meta, dict):
        return {}
    skills = meta.get("skills")
    skills = [str(k) for k in skills] if isinstance(skills, (list, tuple)) else ([str(skills)] if skills else [])
    return {"task": str(meta.get("task") or ""), "skills": MULTI_SEP.join(skills)}


# --- MathVision -------------------------------------------------------------------------------------------

_MATHVISION_INSTRUCTION = (
    "Solve the problem step by step and put the final answer in \\boxed{}. "
    "For a multiple-choice question, put only the option letter in \\boxed{}."
)


def _mathvision(row: Dict, index: int, where: str, opts: Mapping[str, str]) -> Sample:
    options = _option_list(row.get("options"), where)
    question = _text(row, "question", where)
    answer = _text(row, "answer", where)
    prompt = question.replace("<image1>", "").strip()
    if options:
        prompt += "\n\nOptions:\n" + _lettered(options, "{letter}. {option}")
        spec = AnswerSpec(_letter(answer, len(options), where), "choice", num_options=len(options), options=options)
    else:
        spec = AnswerSpec(answer, "auto")
    return Sample(
        "mathvision",
        _text(row, "id", where),
        prompt + "\n\n" + _MATHVISION_INSTRUCTION,
        [_image(row, "decoded_image", where)],
        spec,
        {
            "subject": str(row.get("subject") or ""),
            "level": str(row.get("level") or ""),
            "answer": answer,
            "options": options,
        },
    )


# --- MathVerse (vision-only) ------------------------------------------------------------------------------


def _mathverse(row: Dict, index: int, where: str, opts: Mapping[str, str]) -> Optional[Sample]:
    version = row.get("problem_version")
    if opts["split"] == "testmini" and version is not None and version != "Vision Only":
        return None
    answer = _text(row, "answer", where)
    letter = answer.strip().strip("()")
    if _text(row, "question_type", where) == "multi-choice" and len(letter) == 1 and letter in LETTERS[:MAX_OPTIONS]:
        spec = AnswerSpec(letter, "choice", num_options=MAX_OPTIONS)
    else:  # free-form, or a multiple-choice reference given as the option's value
        spec = AnswerSpec(answer, "auto")
    image = row.get("image")
    return Sample(
        "mathverse",
        _text(row, "sample_index", where),
        # query_cot (default): the release's chain-of-thought prompt; query_wo: its direct-answer prompt, the one
        # lmms-eval sends (tasks/mathverse/mathverse_testmini_vision_only.yaml, query_type "query_wo", read by
        # mathverse_evals.py `create_one_query` as the whole question under shot_type "format-prompt")
        _text(row, opts["prompt_field"], where),
        [image] if isinstance(image, LazyImage) else [],  # the Text Only version has no figure
        spec,
        {
            "question_type": str(row.get("question_type")),
            "problem_version": str(version or "Vision Only"),
            "answer": answer,
            # the question text MathVerse's scoring step reads (the judge's prompt uses it when present)
            **({"question_for_eval": str(row["question_for_eval"])} if row.get("question_for_eval") else {}),
        },
    )


# --- MMMU and MMMU-Pro ------------------------------------------------------------------------------------

_MMMU_CHOICE = "Answer with the option's letter from the given choices directly."
_MMMU_OPEN = "Answer the question using a single word or phrase."


def _mmmu_images(row: Dict, where: str) -> List[LazyImage]:
    images = [row.get("image_%d" % i) for i in range(1, 8)]
    images = [im for im in images if isinstance(im, LazyImage)]
    if not images:
        raise BenchmarkDataError("%s: no image in columns image_1 … image_7" % where)
    return images


def _subject_of(sample_id: str) -> str:
    """MMMU ids are <split>_<Subject>_<n> (the subject may hold underscores: Art_Theory)."""
    parts = sample_id.split("_")
    return "_".join(parts[1:-1]) if len(parts) >= 3 else ""


def _mmmu_like(name: str, row: Dict, where: str, open_allowed: bool) -> Sample:
    options = _option_list(row.get("options"), where)
    question = _text(row, "question", where)
    answer = _text(row, "answer", where)
    is_open = open_allowed and (row.get("question_type") == "open" or not options)
    if is_open:
        golds = _option_list(answer, where) if answer.strip().startswith("[") else [answer]
        prompt, spec = question + "\n\n" + _MMMU_OPEN, AnswerSpec(golds[0], "auto", alternatives=tuple(golds[1:]))
    else:
        if len(options) < 2:
            raise BenchmarkDataError("%s: a multiple-choice question with %d options" % (where, len(options)))
        prompt = question + "\n\n" + _lettered(options) + "\n\n" + _MMMU_CHOICE
        spec = AnswerSpec(_letter(answer, len(options), where), "choice", num_options=len(options), options=options)
    fields = {k: str(row.get(k) or "") for k in ("subject", "subfield", "topic_difficulty", "img_type") if k in row}
    sample_id = _text(row, "id", where)
    if not fields.get("subject"):
        fields["subject"] = _subject_of(sample_id)
    fields.update(_mmmu_scoring(sample_id, answer, options, "open" if is_open else "multiple-choice"))
    return Sample(name, sample_id, prompt, _mmmu_images(row, where), spec, fields)


def _mmmu_scoring(sample_id: str, answer: str, options: List[str], question_type: str) -> Dict:
    """What score_mmmu / score_mmmu_pro read; the id seeds the official random guess."""
    return {"id": sample_id, "answer": answer, "options": options, "question_type": question_type}


def _mmmu(row: Dict, index: int, where: str, opts: Mapping[str, str]) -> Sample:
    return _mmmu_like("mmmu", row, where, open_allowed=True)


_MMMU_PRO_VISION = "Answer with the option letter from the given choices directly."


def _mmmu_pro(row: Dict, index: int, where: str, opts: Mapping[str, str]) -> Sample:
    if opts["split"] != "vision":
        return _mmmu_like("mmmu_pro", row, where, open_allowed=False)
    # the vision setting: question and options are a screenshot; the text is only the instruction (lmms-eval
    # tasks/mmmu_pro/utils.py, `mmmu_pro_doc_to_text` falls back to the post prompt when the row has no
    # question, and `mmmu_pro_doc_to_visual` sends the one `image`)
    options = _option_list(row.get("options"), where)
    answer = _text(row, "answer", where)
    sample_id = _text(row, "id", where)
    spec = AnswerSpec(_letter(answer, len(options), where), "choice", num_options=len(options), options=options)
    fields = {k: str(row.get(k) or "") for k in ("subject", "topic_difficulty") if k in row}
    if not fields.get("subject"):
        fields["subject"] = _subject_of(sample_id)
    fields.update(_mmmu_scoring(sample_id, answer, options, "multiple-choice"))
    return Sample("mmmu_pro", sample_id, _MMMU_PRO_VISION, [_image(row, "image", where)], spec, fields)


# --- MMStar -----------------------------------------------------------------------------------------------


def _mmstar(row: Dict, index: int, where: str, opts: Mapping[str, str]) -> Sample:
    answer = _text(row, "answer", where)
    return Sample(
        "mmstar",
        _text(row, "index", where),
        _text(row, "question", where) + "\n" + _MMMU_CHOICE,  # the options are part of the question text
        [_image(row, "image", where)],
        AnswerSpec(_letter(answer, MAX_OPTIONS, where), "choice", num_options=MAX_OPTIONS),
        {
            **{k: str(row.get(k) or "") for k in ("category", "l2_category") if k in row},
            # score_mmstar reads the options from the question text
            "question": _text(row, "question", where),
            "answer": answer,
        },
    )


# --- HallusionBench ---------------------------------------------------------------------------------------

_YES_NO = "Answer yes or no."
# lmms-eval (tasks/hallusion_bench/hallusion_bench_image.yaml: empty pre/post prompt; evaluate_hb.py
# `hb_doc_to_text`) and the official repo send the question as written; the instruction is opt-in
HALLUSION_INSTRUCTIONS = {"none": "", "yes_no": "\n" + _YES_NO}


def _hallusion(row: Dict, index: int, where: str, opts: Mapping[str, str]) -> Sample:
    gt = _text(row, "gt_answer", where).strip()
    if gt not in ("0", "1"):
        raise BenchmarkDataError("%s: gt_answer %r is not 0 (no) or 1 (yes)" % (where, gt))
    fields = {k: _text(row, k, where) for k in ("category", "subcategory", "set_id", "figure_id", "question_id")}
    image = row.get("image")
    images = [image] if isinstance(image, LazyImage) else []
    sample_id = "%s_%s_%s_%s_%s" % tuple(
        fields[k] for k in ("category", "subcategory", "set_id", "figure_id", "question_id")
    )
    fields["visual_input"] = str(row.get("visual_input", "1" if images else "0"))
    fields["gt_answer"] = gt  # score_hallusionbench reads it with category and figure_id
    if row.get("gt_answer_details"):  # the reference the official judge reads
        fields["gt_answer_details"] = str(row["gt_answer_details"])
    return Sample(
        "hallusionbench",
        sample_id,
        _text(row, "question", where) + HALLUSION_INSTRUCTIONS[opts["instruction"]],
        images,
        AnswerSpec("yes" if gt == "1" else "no", "text"),
        fields,
    )


# Generation limits of the reference harness, used when --max-new-tokens is not given (lmms-eval task files
# read at commit 75571cf; MMStar's task sets none, so its Qwen2.5-VL chat wrapper's default of 128 applies).
GENERATION_SOURCES = {
    "mathvista": "lmms-eval tasks/mathvista/mathvista_testmini_cot.yaml",
    "mathvision": "lmms-eval tasks/mathvision/mathvision_test.yaml",
    "mathverse": "lmms-eval tasks/mathverse/mathverse_testmini_vision_only.yaml",
    "mmmu": "lmms-eval tasks/mmmu/_default_template_yaml",
    "mmmu_pro": "lmms-eval tasks/mmmu_pro/_default_template_yaml",
    "mmstar": "lmms-eval models/chat/qwen2_5_vl.py (the task sets none)",
    "hallusionbench": "lmms-eval tasks/hallusion_bench/hallusion_bench_image.yaml",
}
# below this a step-by-step answer of a reasoning model is often cut before its final answer
REASONING_BUDGET = 2048

BENCHMARKS: Dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "mathvista",
            "MathVista",
            "AI4Math/MathVista",
            "testmini",
            {
                "testmini": ("data/testmini-*.parquet", "testmini-*.parquet"),
                "test": ("data/test-*.parquet", "test-*.parquet"),
            },
            ("pid", "query", "decoded_image", "choices", "answer", "question_type", "answer_type", "precision"),
            ("unit", "metadata"),
            _mathvista,
            "{query}",
            max_new_tokens=16384,
            breakdown=("task", "skills", "question_type"),
            multi_valued=("skills",),
        ),
        Benchmark(
            "mathvision",
            "MathVision",
            "MathLLMs/MathVision",
            "test",
            {
                "test": ("data/test-*.parquet", "test-*.parquet"),
                "testmini": ("data/testmini-*.parquet", "testmini-*.parquet"),
            },
            ("id", "question", "options", "decoded_image", "answer"),
            ("subject", "level"),
            _mathvision,
            "{question}\n\nOptions:\nA. …\n\n" + _MATHVISION_INSTRUCTION,
            max_new_tokens=16384,
            breakdown=("level", "subject"),
        ),
        Benchmark(
            "mathverse",
            "MathVerse",
            "AI4Math/MathVerse",
            "testmini",
            {
                "testmini": ("testmini_vision_only.parquet", "testmini.parquet"),
                "all": ("testmini.parquet",),
            },
            ("sample_index", "query_cot", "query_wo", "answer", "question_type"),
            ("problem_version", "image", "question_for_eval"),
            _mathverse,
            "{prompt_field} (testmini: Vision Only; all: the five problem versions)",
            first_pattern_only=True,
            max_new_tokens=1024,
            breakdown=("problem_version", "question_type"),
            options={
                "prompt_field": Option(
                    "query_cot",
                    ("query_cot", "query_wo"),
                    "the release's field sent as the prompt: query_cot (reason, then answer) or query_wo "
                    "(answer directly, as lmms-eval does)",
                )
            },
        ),
        Benchmark(
            "mmmu",
            "MMMU",
            "MMMU/MMMU",
            "validation",
            {
                "validation": ("*/validation-*.parquet", "validation-*.parquet"),
                "dev": ("*/dev-*.parquet", "dev-*.parquet"),
            },
            ("id", "question", "options", "answer"),
            ("question_type", "subfield", "topic_difficulty", "img_type") + tuple("image_%d" % i for i in range(1, 8)),
            _mmmu,
            "{question}\n\n(A) …\n(B) …\n\n" + _MMMU_CHOICE + " | open: {question}\n\n" + _MMMU_OPEN,
            max_new_tokens=128,
            breakdown=("subject", "topic_difficulty"),
        ),
        Benchmark(
            "mmmu_pro",
            "MMMU-Pro",
            "MMMU/MMMU_Pro",
            "all",
            {
                "standard10": ("standard (10 options)/test-*.parquet", "test-*.parquet"),
                "standard4": ("standard (4 options)/test-*.parquet",),
                "vision": ("vision/test-*.parquet",),
            },
            ("id", "options", "answer"),
            ("question", "image", "subject", "topic_difficulty", "img_type")
            + tuple("image_%d" % i for i in range(1, 8)),
            _mmmu_pro,
            "standard: {question}\n\n(A) …\n…\n\n" + _MMMU_CHOICE + " | vision: [screenshot] " + _MMMU_PRO_VISION,
            max_new_tokens=256,
            breakdown=("setting", "subject"),
            settings={"all": ("standard10", "standard4", "vision")},
        ),
        Benchmark(
            "mmstar",
            "MMStar",
            "Lin-Chen/MMStar",
            "val",
            {"val": ("mmstar.parquet", "*.parquet")},
            ("index", "question", "image", "answer"),
            ("category", "l2_category"),
            _mmstar,
            "{question}\n" + _MMMU_CHOICE,
            max_new_tokens=128,
            breakdown=("category", "l2_category"),
        ),
        Benchmark(
            "hallusionbench",
            "HallusionBench",
            "lmms-lab/HallusionBench",
            "image",
            {
                "all": ("data/image-*.parquet", "data/non_image-*.parquet", "image-*.parquet", "non_image-*.parquet"),
                "image": ("data/image-*.parquet", "image-*.parquet"),
                "non_image": ("data/non_image-*.parquet", "non_image-*.parquet"),
            },
            ("category", "subcategory", "set_id", "figure_id", "question_id", "question", "gt_answer"),
            ("image", "visual_input", "gt_answer_details"),
            _hallusion,
            "{question}{instruction}",
            max_new_tokens=128,
            breakdown=("category", "subcategory"),
            options={
                "instruction": Option(
                    "none",
                    tuple(HALLUSION_INSTRUCTIONS),
                    "text after the question: none (as lmms-eval and the official repo) or yes_no "
                    "(appends %r)" % _YES_NO,
                )
            },
        ),
    )
}

# the paper's column order
PAPER_ORDER = ("mathvista", "mathvision", "mathverse", "mmmu", "mmmu_pro", "mmstar", "hallusionbench")


def get_benchmark(name: str) -> Benchmark:
    key = name.strip().lower().replace("-", "_")
    if key not in BENCHMARKS:
        raise ValueError("benchmark: expected one of %s, got %r" % (", ".join(PAPER_ORDER), name))
    return BENCHMARKS[key]
