"""Final-answer checking against one reference, shared by the evaluation suite and the training rewards.

The answer is read by `avar_ops.grading.extraction` (answer tag, outermost last box, a word-bounded "answer is",
markdown bold, a "Therefore, …" conclusion, the whole response; an empty span falls through to the next rule).
The rule used is recorded with every result so that reports can say how each answer was read.

Checking by kind of reference:

- ``choice``: option letters (A… up to J) read by `extraction.read_choice` (boxed letters, "B is correct",
  the final choice after discarded ones, negations, an option's text when the options are given);
- ``number``: the value of the whole answer (`avar_ops.grading.values`: radicals, fractions, powers, scientific
  notation, units with exponents), compared with a relative/absolute tolerance or, when a precision is given,
  after rounding both to that many decimals; an answer that is an expression the parser cannot read goes to
  math-verify;
- ``latex``: expressions through math-verify in worker processes with a hard deadline
  (`avar_ops.grading.latex_checker`);
- ``text``: yes/no references by VLMEvalKit's rule (the word anywhere, unknown when both or neither), other
  text by case- and punctuation-insensitive string equality.

A result is one of correct / incorrect / timeout / error: a checker that timed out or failed is never scored
as a wrong (or right) answer; callers count those separately. Per-benchmark official rules are in
`avar_ops.grading.scorers`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Iterable, List, Optional, Sequence, Tuple

from avar_ops.grading.extraction import (
    MAX_OPTIONS,
    OPTION_LETTERS,
    candidates,
    choice_from_candidates,
    last_boxed,
    normalise_text,
    read_choice,
    value_from_candidates,
    yes_no_from_candidates,
)
from avar_ops.grading.latex_checker import (
    CORRECT,
    ERROR,
    INCORRECT,
    TIMEOUT,
    LatexChecker,
    default_latex_checker,
)
from avar_ops.grading.values import parse_number

STATUSES = (CORRECT, INCORRECT, TIMEOUT, ERROR)
KINDS = ("auto", "choice", "number", "latex", "text")
__all__ = ["MAX_OPTIONS", "OPTION_LETTERS", "last_boxed", "parse_number"]


@dataclass(frozen=True)
class Extraction:
    text: Optional[str]  # None when nothing could be read
    method: str  # answer_tag | boxed | answer_is | bold | therefore | full | none


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


def extract_answer(response: str) -> Extraction:
    """The final answer of a response: the first candidate of `extraction.candidates` (rule as method)."""
    spans = candidates(response)
    if not spans:
        return Extraction(None, "none")
    return Extraction(spans[0].text, spans[0].rule)


def extract_choice(text: str, num_options: int, options: Optional[Sequence[str]] = None) -> Optional[str]:
    """The option letter a response (or an extracted answer) names, or None (`extraction.read_choice`)."""
    return read_choice(text, num_options, options)[0]


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
        spans = candidates(response)
        gold = str(spec.gold).strip()
        kind = infer_kind(gold) if spec.kind == "auto" else spec.kind
        if not spans:
            return CheckResult(INCORRECT, None, "none", kind, "no answer in the response"), None
        first = Extraction(spans[0].text, spans[0].rule)
        if kind == "choice":
            num_options = spec.num_options or (len(spec.options) if spec.options else MAX_OPTIONS)
            gold_letter = read_choice(gold, num_options)[0]
            if gold_letter is None:
                return CheckResult(ERROR, None, first.method, kind, "reference %r is not an option letter" % gold), None
            if spec.options and len(spec.options) != num_options:
                raise ValueError("options: expected %d option texts, got %d" % (num_options, len(spec.options)))
            letter, rule, _ = choice_from_candidates(spans, num_options, spec.options)
            status = CORRECT if letter == gold_letter else INCORRECT
            return CheckResult(status, letter, rule.split("/")[0], kind, rule), None
        if kind == "number":
            gold_value = parse_number(gold)
            if gold_value is None:
                return CheckResult(ERROR, None, first.method, kind, "reference %r is not a number" % gold), None
            value, rule, span = value_from_candidates(spans)
            if value is None:
                if span is not None and re.search(r"[\\^_{}=+*/]|\d", span.text):
                    return None, (Extraction(span.text, span.rule), span.text, gold)  # an expression: math-verify
                return CheckResult(INCORRECT, None, first.method, kind, "no number in the response"), None
            ok = numbers_match(value, gold_value, precision=spec.precision, rel_tol=spec.rel_tol, abs_tol=spec.abs_tol)
            status = CORRECT if ok else INCORRECT
            return CheckResult(status, _format_number(value), rule.split("/")[0], kind, rule), None
        if kind == "latex":
            return None, (first, first.text, gold)
        if normalise_text(gold) in ("yes", "no"):
            said, rule, _ = yes_no_from_candidates(spans)
            status = CORRECT if said == normalise_text(gold) else INCORRECT
            return CheckResult(status, said, rule, kind, "yes/no"), None
        for span in spans:
            if normalise_text(span.text) == normalise_text(gold):
                return CheckResult(CORRECT, span.text, span.rule, kind), None
        return CheckResult(INCORRECT, first.text, first.method, kind), None


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
