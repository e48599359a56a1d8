"""Final-answer extraction and checking, shared by the evaluation suite and the training rewards.

Extraction takes, in this order: the content of the last ``<answer>…</answer>``; else the last ``\\boxed{…}``;
else rule-based patterns ("The answer is …", "Answer: …"); else the whole response. The method used is
recorded with every result so that reports can say how each answer was read.

Checking by kind of reference:

- ``choice``: option letters (A… up to J), read from "(B)", "B.", "B)", "B", "The answer is B", or from the
  option's text when the options are given;
- ``number``: numbers with commas, units, ``%`` and simple LaTeX (``\\frac{1}{2}``) removed, compared with a
  relative/absolute tolerance or, when a precision is given, after rounding both to that many decimals;
- ``latex``: expressions through math-verify in worker processes with a hard deadline
  (`avar_ops.grading.latex_checker`);
- ``text``: case- and punctuation-insensitive string equality (yes/no and short phrases).

A result is one of correct / incorrect / timeout / error: a checker that timed out or failed is never scored
as a wrong (or right) answer; callers count those separately.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, replace
from typing import Iterable, List, Optional, Sequence, Tuple

from avar_ops.grading.latex_checker import (
    CORRECT,
    ERROR,
    INCORRECT,
    TIMEOUT,
    LatexChecker,
    default_latex_checker,
)

STATUSES = (CORRECT, INCORRECT, TIMEOUT, ERROR)
KINDS = ("auto", "choice", "number", "latex", "text")
MAX_OPTIONS = 10
OPTION_LETTERS = string.ascii_uppercase[:MAX_OPTIONS]


@dataclass(frozen=True)
class Extraction:
    text: Optional[str]  # None when nothing could be read
    method: str  # answer_tag | boxed | answer_is | full | none


@dataclass(frozen=True)
class CheckResult:
    status: str  # correct | incorrect | timeout | error
    extracted: Optional[str]  # the answer read from the response (a letter for choices)
    method: str  # how it was read (see Extraction.method)
    kind: str  # the comparison used: choice | number | latex | text
    detail: str = ""

    @property
    def correct(self) -> bool:
        return self.status == CORRECT

    @property
    def scored(self) -> bool:
        """False for timeouts and checker errors, which must be counted apart, not scored."""
        return self.status in (CORRECT, INCORRECT)


# --- extraction -------------------------------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_IS = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)?\s*[:：]?\s*(.+)",
    re.IGNORECASE,
)


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``) with balanced braces, else None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    if text[start:i].strip() not in ("\\boxed", "\\fbox"):
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def _strip_wrappers(text: str) -> str:
    text = text.strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    text = text.strip().strip("*").strip()
    if len(text) >= 2 and text[0] == text[-1] == "$":
        text = text.strip("$").strip()
    return text.rstrip(".").strip()


def extract_answer(response: str) -> Extraction:
    """The final answer of a response: answer tag, else last boxed, else "the answer is …", else all of it."""
    if not isinstance(response, str):
        raise TypeError("response: expected a str, got %s" % type(response).__name__)
    tags = _ANSWER_TAG.findall(response)
    if tags:
        return Extraction(_strip_wrappers(tags[-1]), "answer_tag")
    boxed = last_boxed(response)
    if boxed is not None:
        return Extraction(_strip_wrappers(boxed), "boxed")
    matches = list(_ANSWER_IS.finditer(response))
    if matches:
        line = matches[-1].group(1).split("\n")[0]
        return Extraction(_strip_wrappers(line), "answer_is")
    text = response.strip()
    if not text:
        return Extraction(None, "none")
    return Extraction(_strip_wrappers(text), "full")


# --- multiple choice --------------------------------------------------------------------------------------


def _letters(num_options: int) -> str:
    if not 2 <= num_options <= MAX_OPTIONS:
        raise ValueError("num_options: expected 2..%d, got %r" % (MAX_OPTIONS, num_options))
    return OPTION_LETTERS[:num_options]


def _normalise_text(text: str) -> str:
    text = text.lower().strip()
    text = re.sub(r"[\s]+", " ", text)
    text = re.sub(r" ?, ?", ",", text)  # "[1, 2]" and "[1,2]" are the same list
    return text.strip(" .,:;!?\"'`*()[]")


def extract_choice(text: str, num_options: int, options: Optional[Sequence[str]] = None) -> Optional[str]:
    """The option letter a response (or an extracted answer) names, or None.

    Tried in order: the whole text is a letter ("B", "(B)", "B.", "B)"); it starts with one followed by its
    option ("B. 42", "(B) 42"); "answer is (B)"; the last parenthesised letter; the option text itself when
    exactly one option's text appears (the latest one wins when several do).
    """
    letters = _letters(num_options)
    stripped = text.strip().strip("*").strip()
    cls = "[%s]" % letters
    whole = re.fullmatch(r"[\(\[]?(%s)[\)\]]?[.:]?" % cls, stripped, re.IGNORECASE)
    if whole and (stripped.isupper() or len(stripped) > 1 or stripped in letters.lower()):
        return whole.group(1).upper()
    lead = re.match(r"[\(\[]?(%s)(?:[\)\]][.:]?|[.:])\s" % cls, stripped)
    if lead:
        return lead.group(1)
    said = re.findall(
        r"(?:answer|option|choice)\s*(?:is|:)?\s*(?:option\s*)?[\(\[]?(%s)(?:[\)\]]|\b)" % cls,
        stripped,
        re.IGNORECASE,
    )
    said = [s for s in said if s.isupper()]
    if said:
        return said[-1]
    parenthesised = re.findall(r"\((%s)\)" % cls, stripped)
    if parenthesised:
        return parenthesised[-1]
    if options:
        if len(options) != num_options:
            raise ValueError("options: expected %d option texts, got %d" % (num_options, len(options)))
        haystack = _normalise_text(stripped)
        found = []
        for letter, option in zip(letters, options):
            needle = _normalise_text(str(option))
            mentions = (
                [m.start() for m in re.finditer(r"(?<!\w)%s(?!\w)" % re.escape(needle), haystack)] if needle else []
            )
            if mentions:
                found.append((mentions[-1], letter))
        if found:
            return max(found)[1]
    return None


# --- numbers ----------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-−]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|[-−]?\.\d+")
_FRACTION = re.compile(r"^(-?)\\[dt]?frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}$")
_SLASH = re.compile(r"^(-?[\d.]+)\s*/\s*(-?[\d.]+)$")


def _plain_number(token: str) -> Optional[float]:
    token = token.replace("−", "-").replace(",", "")
    try:
        return float(token)
    except ValueError:
        return None


def parse_number(text: str) -> Optional[float]:
    """A number written alone, possibly with units, %, $, thousands commas or a simple fraction; else None."""
    s = text.strip()
    s = re.sub(r"\\text\{([^}]*)\}|\\mathrm\{([^}]*)\}", lambda m: " " + (m.group(1) or m.group(2) or ""), s)
    s = s.replace("\\%", "%").replace("\\$", "$").replace("\\,", "").replace("\\!", "").replace("^\\circ", "")
    s = s.replace("°", " ").strip().strip("$").strip()
    fraction = _FRACTION.match(s) or _SLASH.match(s)
    if fraction:
        groups = fraction.groups()
        sign = -1.0 if len(groups) == 3 and groups[0] == "-" else 1.0
        num, den = (_plain_number(groups[-2]), _plain_number(groups[-1]))
        if num is None or den is None or den == 0:
            return None
        return sign * num / den
    numbers = _NUMBER.findall(s)
    if len(numbers) != 1:
        return None
    before, _, after = s.partition(numbers[0])
    # a unit may follow (letters, %, ^2) and a currency sign may precede; anything else is not a lone number
    if before.strip() not in ("", "$", "€", "£", "¥", "=", "≈", "x =", "x="):
        return None
    if after.strip() and not re.fullmatch(r"\s*(?:%|[A-Za-zµ°/\^\d\s\.²³]+)\s*", after):
        return None
    return _plain_number(numbers[0])


def last_number(text: str) -> Optional[float]:
    numbers = _NUMBER.findall(text)
    return _plain_number(numbers[-1]) if numbers else None


def numbers_match(
    pred: float,
    gold: float,
    *,
    precision: Optional[int] = None,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
) -> bool:
    if not (math.isfinite(pred) and math.isfinite(gold)):
        return False
    if precision is not None:
        return round(pred, precision) == round(gold, precision)
    return math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=abs_tol)


# --- checking ---------------------------------------------------------------------------------------------


def _is_letter(gold: str) -> bool:
    return re.fullmatch(r"[\(]?[A-J][\)]?", gold.strip()) is not None


def infer_kind(gold: str) -> str:
    """choice for a letter, number for a plain number, latex for anything with a math sign, else text."""
    gold = str(gold).strip()
    if _is_letter(gold):
        return "choice"
    if parse_number(gold) is not None and re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", gold)) is None:
        return "number"
    if re.search(r"[\\^_{}=+*/]|\d", gold):
        return "latex"
    return "text"


@dataclass(frozen=True)
class AnswerSpec:
    """What a response is checked against: reference, kind, and for choices / numbers their settings.
    `alternatives` are further accepted references (MMMU's open questions list several)."""

    gold: str
    kind: str = "auto"
    num_options: int = 0
    options: Optional[Sequence[str]] = None
    precision: Optional[int] = None
    rel_tol: float = 1e-6
    abs_tol: float = 1e-9
    alternatives: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError("kind: expected one of %s, got %r" % ("/".join(KINDS), self.kind))


class AnswerChecker:
    """Checks responses against references; LaTeX pairs go through `latex` (a process-wide pool by default).

    `counts` tallies every status returned, so callers can log timeouts and checker errors.
    """

    def __init__(self, latex: Optional[LatexChecker] = None):
        self._latex = latex
        self.counts = {s: 0 for s in STATUSES}

    @property
    def latex(self) -> LatexChecker:
        if self._latex is None:
            self._latex = default_latex_checker()
        return self._latex

    def check(self, response: str, spec: AnswerSpec) -> CheckResult:
        return self.check_many([response], [spec])[0]

    def check_many(self, responses: Sequence[str], specs: Sequence[AnswerSpec]) -> List[CheckResult]:
        if len(responses) != len(specs):
            raise ValueError(
                "responses and specs: expected equal lengths, got %d and %d" % (len(responses), len(specs))
            )
        owners, flat_responses, flat_specs = [], [], []
        for index, (response, spec) in enumerate(zip(responses, specs)):
            for gold in (spec.gold, *spec.alternatives):
                owners.append(index)
                flat_responses.append(response)
                flat_specs.append(replace(spec, gold=gold, alternatives=()))
        per_reference = self._check_each(flat_responses, flat_specs)
        results = [_best([r for o, r in zip(owners, per_reference) if o == i]) for i in range(len(specs))]
        for result in results:
            self.counts[result.status] += 1
        return results

    def _check_each(self, responses: Sequence[str], specs: Sequence[AnswerSpec]) -> List[CheckResult]:
        results: List[Optional[CheckResult]] = []
        latex_jobs = []  # (index, extraction, prediction, gold)
        for index, (response, spec) in enumerate(zip(responses, specs)):
            result, latex_job = self._check_local(response, spec)
            results.append(result)
            if latex_job is not None:
                latex_jobs.append((index,) + latex_job)
        if latex_jobs:
            verdicts = self.latex.check_many([(pred, gold) for _, _, pred, gold in latex_jobs])
            for (index, extraction, pred, _), verdict in zip(latex_jobs, verdicts):
                results[index] = CheckResult(verdict.status, pred, extraction.method, "latex", verdict.detail)
        return results  # type: ignore[return-value]

    def _check_local(self, response: str, spec: AnswerSpec):
        """A result now, or (extraction, prediction, gold) to send to the LaTeX pool."""
        extraction = extract_answer(response)
        gold = str(spec.gold).strip()
        kind = infer_kind(gold) if spec.kind == "auto" else spec.kind
        if not extraction.text:
            return CheckResult(INCORRECT, None, extraction.method, kind, "no answer in the response"), None
        if kind == "choice":
            num_options = spec.num_options or (len(spec.options) if spec.options else MAX_OPTIONS)
            gold_letter = extract_choice(gold, num_options)
            if gold_letter is None:
                return CheckResult(
                    ERROR, None, extraction.method, kind, "reference %r is not an option letter" % gold
                ), None
            letter = None
            if extraction.method == "answer_is":
                # "The answer is B because (C) …": the letter right after "the answer is" decides
                first = re.match(r"\(?([%s])\)?(?!\w)" % _letters(num_options), extraction.text)
                letter = first.group(1) if first else None
            letter = letter or extract_choice(extraction.text, num_options, spec.options)
            if letter is None and extraction.method != "full":
                letter = extract_choice(response, num_options, spec.options)
            status = CORRECT if letter == gold_letter else INCORRECT
            return CheckResult(status, letter, extraction.method, kind), None
        if kind == "number":
            gold_value = parse_number(gold)
            if gold_value is None:
                return CheckResult(ERROR, None, extraction.method, kind, "reference %r is not a number" % gold), None
            value = parse_number(extraction.text)
            if value is None and extraction.method in ("answer_is", "full"):
                value = last_number(extraction.text)
            if value is None and extraction.method == "full":
                return CheckResult(INCORRECT, None, extraction.method, kind, "no number in the response"), None
            if value is None:
                # e.g. "\sqrt{4}" or "2^{-1}": let math-verify decide
                return None, (extraction, extraction.text, gold)
            ok = numbers_match(value, gold_value, precision=spec.precision, rel_tol=spec.rel_tol, abs_tol=spec.abs_tol)
            return CheckResult(CORRECT if ok else INCORRECT, _format_number(value), extraction.method, kind), None
        if kind == "latex":
            return None, (extraction, extraction.text, gold)
        ok = _normalise_text(extraction.text) == _normalise_text(gold)
        if not ok and extraction.method == "full":
            ok = re.split(r"[\s,.;:!?]+", _normalise_text(extraction.text))[0] == _normalise_text(gold)
        return CheckResult(CORRECT if ok else INCORRECT, extraction.text, extraction.method, kind), None


def _best(results: List[CheckResult]) -> CheckResult:
    """Correct if one reference matches; incorrect only if every reference could be checked; else the first
    timeout or error (a reference that was not checked might have matched)."""
    for wanted in (lambda r: r.correct, lambda r: not r.scored):
        for r in results:
            if wanted(r):
                return r
    return results[0]


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def check_answer(response: str, gold: str, kind: str = "auto", **settings) -> CheckResult:
    """Check one response with the process-wide checker; `settings` are `AnswerSpec` fields."""
    return AnswerChecker().check(response, AnswerSpec(str(gold), kind, **settings))


def check_answers(responses: Iterable[str], specs: Iterable[AnswerSpec], checker: Optional[AnswerChecker] = None):
    """Check many responses at once (LaTeX pairs run in parallel in the pool)."""
    return (checker or AnswerChecker()).check_many(list(responses), list(specs))
