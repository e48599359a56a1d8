"""The seven benchmarks of the paper's table, read from their published Hugging Face parquet releases.

Each benchmark knows its release's file layout and columns, builds the prompt the way its authors do, and says
how its answers are checked (`AnswerSpec`). Files are given as a local file or folder:

==============  ===========================  =================================================================
name            release                      files (in the folder given)
==============  ===========================  =================================================================
mathvista       AI4Math/MathVista            data/testmini-*.parquet (split testmini; also test)
mathvision      MathLLMs/MathVision          data/test-*.parquet (split test; also testmini)
mathverse       AI4Math/MathVerse            testmini.parquet, Vision Only rows (or the lmms-eval
                                             testmini_vision_only.parquet)
mmmu            MMMU/MMMU                    <Subject>/validation-*.parquet (split validation; also dev)
mmmu_pro        MMMU/MMMU_Pro                standard (10 options)/test-*.parquet
mmstar          Lin-Chen/MMStar              mmstar.parquet (split val)
hallusionbench  lmms-lab/HallusionBench      data/image-*.parquet and data/non_image-*.parquet
==============  ===========================  =================================================================
"""

from __future__ import annotations

import ast
import string
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from avar_ops.data import TextError, check_text
from avar_ops.eval.parquet_files import BenchmarkDataError, LazyImage, find_files, read_rows
from avar_ops.grading import MAX_OPTIONS, AnswerSpec, CheckResult

LETTERS = string.ascii_uppercase


@dataclass
class Sample:
    """One question: the prompt as the benchmark's authors build it, its images and how to check the answer."""

    benchmark: str
    id: str
    prompt: str
    images: List[LazyImage]
    answer: AnswerSpec
    fields: Dict[str, str] = field(default_factory=dict)  # grouping / breakdown fields (category, set_id, …)


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str  # as in the paper's table
    release: str
    default_split: str
    files: Dict[str, Tuple[str, ...]]  # split -> glob patterns under the folder
    required: Tuple[str, ...]
    optional: Tuple[str, ...]
    build: Callable[[Dict, int, str], Optional[Sample]]  # row, index, where -> sample (None: not in the subset)
    prompt_template: str  # recorded in every report
    first_pattern_only: bool = False  # use only the first pattern that matches (alternative layouts of one file)

    def load(self, path: str, split: Optional[str] = None, limit: Optional[int] = None) -> List[Sample]:
        split = split or self.default_split
        if split not in self.files:
            raise BenchmarkDataError(
                "%s: unknown split %r (expected one of %s)" % (self.name, split, ", ".join(sorted(self.files)))
            )
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
            raise ValueError("limit: expected a positive integer or None, got %r" % (limit,))
        what = "%s (%s split)" % (self.name, split)
        patterns = self.files[split]
        if self.first_pattern_only:
            patterns = next(((p,) for p in patterns if _matches(path, p)), patterns)
        files = find_files(path, patterns, what)
        rows = read_rows(files, self.required, self.optional, self.name)
        samples = []
        for index, row in enumerate(rows):
            sample = self.build(row, index, "%s row %d" % (self.name, index))
            if sample is not None:
                try:  # the question goes to the tokenizer as typed: no template markers in it
                    check_text(sample.prompt, where="%s: %s sample %r" % (path, self.name, sample.id), field="question")
                except TextError as exc:
                    raise BenchmarkDataError(str(exc)) from None
                samples.append(sample)
                if limit is not None and len(samples) >= limit:
                    break
        if not samples:
            raise BenchmarkDataError("%s: no samples of the %s split in %s" % (self.name, split, path))
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise BenchmarkDataError("%s: sample ids are not unique in %s" % (self.name, path))
        return samples

    def score(self, samples: Sequence[Sample], results: Sequence[CheckResult]) -> Dict[str, float]:
        return accuracy(results) if self.name != "hallusionbench" else hallusion_scores(samples, results)


def _matches(path: str, pattern: str) -> bool:
    try:
        find_files(path, (pattern,), "")
    except BenchmarkDataError:
        return False
    return True


# --- scoring ----------------------------------------------------------------------------------------------


def accuracy(results: Sequence[CheckResult]) -> Dict[str, float]:
    """Accuracy over the answers that were checked; timeouts and checker errors are counted apart."""
    scored = [r for r in results if r.scored]
    correct = sum(r.correct for r in scored)
    return {
        "accuracy": 100.0 * correct / len(scored) if scored else float("nan"),
        "n": len(results),
        "n_scored": len(scored),
        "n_correct": correct,
        "n_timeout": sum(r.status == "timeout" for r in results),
        "n_error": sum(r.status == "error" for r in results),
    }


def hallusion_scores(samples: Sequence[Sample], results: Sequence[CheckResult]) -> Dict[str, float]:
    """HallusionBench's three accuracies: all questions (aAcc), figures whose every question is right (fAcc),
    and questions right on every figure they are asked about (qAcc). `accuracy` is aAcc.

    A group with a timeout or checker error in it is left out of fAcc / qAcc (it cannot be judged).
    """
    scores = accuracy(results)
    figures, questions = defaultdict(list), defaultdict(list)
    for sample, result in zip(samples, results):
        f = sample.fields
        figures[(f["category"], f["subcategory"], f["set_id"], f["figure_id"])].append(result)
        questions[(f["category"], f["subcategory"], f["set_id"], f["question_id"])].append(result)
    for name, groups in (("fAcc", figures), ("qAcc", questions)):
        judged = [g for g in groups.values() if all(r.scored for r in g)]
        scores[name] = 100.0 * sum(all(r.correct for r in g) for g in judged) / len(judged) if judged else float("nan")
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


def _mathvista(row: Dict, index: int, where: str) -> Sample:
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
            precision = row.get("precision")
            defined = precision is not None and precision == precision  # the release stores NaN when unset
            spec = AnswerSpec(answer, "number", precision=int(precision) if defined else None)
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
        },
    )


# --- MathVision -------------------------------------------------------------------------------------------

_MATHVISION_INSTRUCTION = (
    "Solve the problem step by step and put the final answer in \\boxed{}. "
    "For a multiple-choice question, put only the option letter in \\boxed{}."
)


def _mathvision(row: Dict, index: int, where: str) -> Sample:
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
        {"subject": str(row.get("subject") or ""), "level": str(row.get("level") or "")},
    )


# --- MathVerse (vision-only) ------------------------------------------------------------------------------


def _mathverse(row: Dict, index: int, where: str) -> Optional[Sample]:
    version = row.get("problem_version")
    if version is not None and version != "Vision Only":
        return None
    answer = _text(row, "answer", where)
    letter = answer.strip().strip("()")
    if _text(row, "question_type", where) == "multi-choice" and len(letter) == 1 and letter in LETTERS[:MAX_OPTIONS]:
        spec = AnswerSpec(letter, "choice", num_options=MAX_OPTIONS)
    else:  # free-form, or a multiple-choice reference given as the option's value
        spec = AnswerSpec(answer, "auto")
    return Sample(
        "mathverse",
        _text(row, "sample_index", where),
        _text(row, "query_cot", where),  # the release's chain-of-thought prompt (the question is in the image)
        [_image(row, "image", where)],
        spec,
        {"question_type": str(row.get("question_type"))},
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
    return Sample(name, _text(row, "id", where), prompt, _mmmu_images(row, where), spec, fields)


def _mmmu(row: Dict, index: int, where: str) -> Sample:
    return _mmmu_like("mmmu", row, where, open_allowed=True)


def _mmmu_pro(row: Dict, index: int, where: str) -> Sample:
    return _mmmu_like("mmmu_pro", row, where, open_allowed=False)


# --- MMStar -----------------------------------------------------------------------------------------------


def _mmstar(row: Dict, index: int, where: str) -> Sample:
    answer = _text(row, "answer", where)
    return Sample(
        "mmstar",
        _text(row, "index", where),
        _text(row, "question", where) + "\n" + _MMMU_CHOICE,  # the options are part of the question text
        [_image(row, "image", where)],
        AnswerSpec(_letter(answer, MAX_OPTIONS, where), "choice", num_options=MAX_OPTIONS),
        {k: str(row.get(k) or "") for k in ("category", "l2_category") if k in row},
    )


# --- HallusionBench ---------------------------------------------------------------------------------------

_YES_NO = "Answer yes or no."


def _hallusion(row: Dict, index: int, where: str) -> Sample:
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
    return Sample(
        "hallusionbench",
        sample_id,
        _text(row, "question", where) + "\n" + _YES_NO,
        images,
        AnswerSpec("yes" if gt == "1" else "no", "text"),
        fields,
    )


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
            ("unit",),
            _mathvista,
            "{query}",
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
        ),
        Benchmark(
            "mathverse",
            "MathVerse",
            "AI4Math/MathVerse",
            "testmini",
            {"testmini": ("testmini_vision_only.parquet", "testmini.parquet")},
            ("sample_index", "query_cot", "image", "answer", "question_type"),
            ("problem_version",),
            _mathverse,
            "{query_cot} (Vision Only)",
            first_pattern_only=True,
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
        ),
        Benchmark(
            "mmmu_pro",
            "MMMU-Pro",
            "MMMU/MMMU_Pro (standard, 10 options)",
            "test",
            {"test": ("standard (10 options)/test-*.parquet", "test-*.parquet")},
            ("id", "question", "options", "answer"),
            ("subject", "topic_difficulty", "img_type") + tuple("image_%d" % i for i in range(1, 8)),
            _mmmu_pro,
            "{question}\n\n(A) …\n…\n(J) …\n\n" + _MMMU_CHOICE,
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
        ),
        Benchmark(
            "hallusionbench",
            "HallusionBench",
            "lmms-lab/HallusionBench",
            "all",
            {
                "all": ("data/image-*.parquet", "data/non_image-*.parquet", "image-*.parquet", "non_image-*.parquet"),
                "image": ("data/image-*.parquet", "image-*.parquet"),
                "non_image": ("data/non_image-*.parquet", "non_image-*.parquet"),
            },
            ("category", "subcategory", "set_id", "figure_id", "question_id", "question", "gt_answer"),
            ("image", "visual_input"),
            _hallusion,
            "{question}\n" + _YES_NO,
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
