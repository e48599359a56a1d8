"""One scorer per benchmark, each implementing that benchmark's official rule on top of `extraction`.

    score(benchmark, response, fields, mode="official") -> ScoreResult(correct, extracted, rule, mode, flagged)

`fields` are the sample's own columns (the names of the release): ``answer`` (the reference) and, per
benchmark, ``question_type``, ``answer_type``, ``precision``, ``choices`` / ``options``, ``id``,
``category``, ``figure_id``. `mode` is ``official`` or ``strict``; the two differ only where the official rule
is itself lenient (MMMU's random guess when no letter is found and its substring match on open questions,
MathVista's mapping of any text to the most similar choice and its integer truncation, HallusionBench's
"unclear" answer counted correct on a question without a figure when the answer hedges with both words).
Every result says which mode was used and which rule decided; ``flagged`` marks a verdict the official rule
reached by a guess or a similarity mapping, so that reports can count them.

The official code read for each rule is cited at its scorer. Where the official pipeline extracts the answer
with a GPT model (MathVista, MathVerse, HallusionBench), the rule-based extraction of `extraction` stands in
for it, and the official comparison is applied to what it reads.
"""

from __future__ import annotations

import ast
import math
import random
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from avar_ops.grading.extraction import (
    MAX_OPTIONS,
    OPTION_LETTERS,
    Candidate,
    candidates,
    choice_from_candidates,
    neither_yes_nor_no,
    normalise_text,
    read_choice,
    strip_think,
    value_from_candidates,
    yes_no_from_candidates,
)
from avar_ops.grading.latex_checker import CORRECT, ERROR, INCORRECT, LatexChecker, default_latex_checker
from avar_ops.grading.values import evaluate, format_value, parse_number

MODES = ("official", "strict")
BENCHMARK_NAMES = ("mathvista", "mathvision", "mathverse", "mmmu", "mmmu_pro", "mmstar", "hallusionbench")


@dataclass(frozen=True)
class ScoreResult:
    correct: bool
    extracted: Optional[str]  # what was read from the response (a letter, a value, yes / no / unknown, a span)
    rule: str  # how it was read and decided, e.g. "boxed/whole", "answer_is/value; round(2)"
    mode: str  # official | strict
    flagged: bool = False  # the official rule guessed (MMMU) or mapped by similarity (MathVista)
    status: str = CORRECT  # correct | incorrect | timeout | error (timeouts and errors are not scored)
    detail: str = ""

    @property
    def scored(self) -> bool:
        return self.status in (CORRECT, INCORRECT)


def _result(ok: bool, extracted, rule: str, mode: str, flagged: bool = False, detail: str = "") -> ScoreResult:
    return ScoreResult(bool(ok), extracted, rule, mode, flagged, CORRECT if ok else INCORRECT, detail)


def _options(fields: Mapping, key: str) -> List[str]:
    value = fields.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value) if value.strip() else []
        except (ValueError, SyntaxError):
            raise ValueError("fields: %s %r is not a list" % (key, value[:80])) from None
    if not isinstance(value, (list, tuple)):
        raise ValueError("fields: %s must be a list, got %s" % (key, type(value).__name__))
    return [str(v) for v in value]


def _gold(fields: Mapping) -> str:
    if "answer" not in fields or fields["answer"] is None or not str(fields["answer"]).strip():
        raise ValueError("fields: expected a non-empty 'answer', got %r" % (fields.get("answer"),))
    return str(fields["answer"]).strip()


def _letter_of(gold: str, num_options: int) -> str:
    letter = read_choice(gold, num_options)[0] if len(gold.strip("() ")) == 1 else None
    if letter is None:
        raise ValueError("fields: answer %r is not one of the %d option letters" % (gold, num_options))
    return letter


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _values_equal(pred: Optional[float], gold: Optional[float], decimals: Optional[int] = None) -> bool:
    if pred is None or gold is None or not (math.isfinite(pred) and math.isfinite(gold)):
        return False
    if decimals is not None:
        return round(pred, decimals) == round(gold, decimals)
    return math.isclose(pred, gold, rel_tol=1e-6, abs_tol=1e-9)


def _latex_equal(pred: str, gold: str, latex: Optional[LatexChecker]):
    verdict = (latex or default_latex_checker()).check(pred, gold)
    return verdict.status, verdict.detail


# --- MathVista --------------------------------------------------------------------------------------------


def score_mathvista(response: str, fields: Mapping, mode: str, latex=None) -> ScoreResult:
    """MathVista (lupantech/MathVista evaluation/calculate_score.py, normalize_extracted_answer and safe_equal):
    a choice is the option whose letter or text the answer gives, else the choice most similar to the answer
    by edit distance (get_most_similar); an integer answer is ``str(int(float(x)))``; a float is rounded to
    the sample's ``precision``; text and lists are compared as strings. The official extraction is a GPT call
    (evaluation/extract_answer.py) with a quick path for answers that already are a choice or a number; here
    `extraction.candidates` reads the answer. strict: no similarity mapping (an answer naming no option is
    wrong) and integers are compared by value, not truncated."""
    gold = _gold(fields)
    spans = candidates(response)
    if not spans:
        return _result(False, None, "none", mode, detail="no answer in the response")
    if fields.get("question_type") == "multi_choice":
        choices = _options(fields, "choices")
        if gold not in choices:
            raise ValueError("fields: answer %r is not among the choices %r" % (gold, choices))
        gold_letter = OPTION_LETTERS[choices.index(gold)]
        letter, rule, span = choice_from_candidates(spans, len(choices), choices)
        if letter is not None:
            return _result(letter == gold_letter, letter, rule, mode)
        if mode == "strict":
            return _result(False, None, "none", mode, detail="the answer names no option")
        text = spans[0].text
        nearest = min(range(len(choices)), key=lambda i: _edit_distance(text, choices[i]))
        letter = OPTION_LETTERS[nearest]
        return _result(letter == gold_letter, letter, "%s/most_similar" % spans[0].rule, mode, flagged=True)
    answer_type = fields.get("answer_type")
    if answer_type in ("integer", "float"):
        value, rule, span = value_from_candidates(spans)
        gold_value = parse_number(gold)
        if gold_value is None:
            raise ValueError("fields: answer %r is not a number" % gold)
        if value is None:
            return _result(False, None, rule, mode, detail="no number in the answer")
        if answer_type == "integer":
            if mode == "official":
                return _result(int(value) == int(gold_value), str(int(value)), rule + "; int()", mode)
            return _result(_values_equal(value, gold_value), format_value(value), rule, mode)
        precision = fields.get("precision")
        precision = int(precision) if precision is not None and precision == precision else None
        ok = _values_equal(value, gold_value, precision if precision is not None else None)
        return _result(ok, format_value(value), rule + ("; round(%s)" % precision), mode)
    for span in spans:
        if normalise_text(span.text) == normalise_text(gold):
            return _result(True, span.text, span.rule + "/text", mode)
    return _result(False, spans[0].text, spans[0].rule + "/text", mode)


# --- MathVision -------------------------------------------------------------------------------------------


def score_mathvision(response: str, fields: Mapping, mode: str, latex=None) -> ScoreResult:
    """MathVision (mathllm/MATH-V evaluation/evaluate.py, evaluate; evaluation/utils.py, is_equal): the
    answer is right when it equals the reference or, for a multiple-choice question, the chosen option's
    value; equality is exact text, else both sides evaluated and rounded to 2 decimals (12.57 equals 4\\pi).
    The same in both modes. Symbolic answers the value parser cannot read go to math-verify."""
    gold = _gold(fields)
    options = _options(fields, "options")
    spans = candidates(response)
    if not spans:
        return _result(False, None, "none", mode, detail="no answer in the response")
    if options:
        gold_letter = _letter_of(gold, len(options))
        letter, rule, span = choice_from_candidates(spans, len(options), options)
        if letter is not None:
            return _result(letter == gold_letter, letter, rule, mode)
        option_value = evaluate(options[OPTION_LETTERS.index(gold_letter)])
        value, rule, span = value_from_candidates(spans)
        if value is not None and option_value is not None:
            # the option's value given instead of its letter
            return _result(_values_equal(value, option_value, 2), format_value(value), rule + "; option value", mode)
        return _result(False, None, "none", mode, detail="the answer names no option")
    gold_value = evaluate(gold)
    value, rule, span = value_from_candidates(spans)
    if gold_value is not None and value is not None:
        return _result(_values_equal(value, gold_value, 2), format_value(value), rule + "; round(2)", mode)
    span = span or spans[0]
    if normalise_text(span.text).replace(" ", "") == normalise_text(gold).replace(" ", ""):
        return _result(True, span.text, span.rule + "/text", mode)
    if gold_value is not None and value is None and not re.search(r"[\\^{}=+*/\d]", span.text):
        return _result(False, span.text, span.rule, mode, detail="no value in the answer")
    status, detail = _latex_equal(span.text, gold, latex)
    return ScoreResult(status == CORRECT, span.text, span.rule + "/math-verify", mode, False, status, detail)


# --- MathVerse --------------------------------------------------------------------------------------------


def score_mathverse(response: str, fields: Mapping, mode: str, latex=None) -> ScoreResult:
    """MathVerse: the official scoring (lmms-eval tasks/mathverse/mathverse_evals.py, MathVerseEvaluator:
    a GPT extraction, then an exact-match shortcut before a GPT judgement of equivalence) has no rule-based
    form; rule-based, a multiple-choice answer is its letter and a free-form one is right when its value equals
    the reference's (relative 1e-6) or math-verify finds the expressions equal. The same in both modes."""
    gold = _gold(fields)
    spans = candidates(response)
    if not spans:
        return _result(False, None, "none", mode, detail="no answer in the response")
    letter_gold = gold.strip("() ")
    if fields.get("question_type") == "multi-choice" and len(letter_gold) == 1 and letter_gold in OPTION_LETTERS:
        letter, rule, span = choice_from_candidates(spans, MAX_OPTIONS)
        return _result(letter == letter_gold, letter, rule, mode)
    gold_value = evaluate(gold)
    value, rule, span = value_from_candidates(spans)
    if gold_value is not None:
        if value is not None:
            return _result(_values_equal(value, gold_value), format_value(value), rule, mode)
        if span is None or not re.search(r"[\\^{}=+*/\d]", span.text):
            return _result(False, None, rule, mode, detail="no value in the answer")
    span = span or spans[0]
    if normalise_text(span.text) == normalise_text(gold):
        return _result(True, span.text, span.rule + "/text", mode)
    status, detail = _latex_equal(span.text, gold, latex)
    return ScoreResult(status == CORRECT, span.text, span.rule + "/math-verify", mode, False, status, detail)


# --- MMMU and MMMU-Pro ------------------------------------------------------------------------------------


def mmmu_guess(sample_id: str, letters: Sequence[str], seed: int = 42) -> str:
    """MMMU's random pick when no letter is found, made reproducible per sample (the official code seeds the
    global generator once, so its guesses depend on the order of the samples)."""
    return random.Random("%d:%s" % (seed, sample_id)).choice(list(letters))


def _mmmu_choice(response: str, fields: Mapping, mode: str, name: str) -> ScoreResult:
    options = _options(fields, "options")
    if len(options) < 2 or len(options) > MAX_OPTIONS:
        raise ValueError("fields: %s options: expected 2..%d, got %d" % (name, MAX_OPTIONS, len(options)))
    gold_letter = _letter_of(_gold(fields), len(options))
    spans = candidates(response)
    letter, rule, _ = choice_from_candidates(spans, len(options), options)
    if letter is not None:
        return _result(letter == gold_letter, letter, rule, mode)
    if mode == "strict":
        return _result(False, None, "none", mode, detail="no option letter in the response")
    guess = mmmu_guess(str(fields.get("id", "")), OPTION_LETTERS[: len(options)])
    return _result(guess == gold_letter, guess, "random_guess", mode, flagged=True, detail="seeded guess")


def _mmmu_numbers(text: str) -> List[str]:
    # MMMU's extract_numbers: comma-grouped numbers, scientific notation, plain numbers
    commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
    return commas + scientific + simple


def _mmmu_normalise(text: str) -> list:
    # MMMU's normalize_str: a number becomes a float rounded to 2 decimals; a one-letter string is padded
    s = text.strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        s = s.lower()
        return [" " + s, s + " "] if len(s) == 1 else [s]


def mmmu_open_predictions(text: str) -> list:
    """MMMU's parse_open_response (MMMU-Benchmark/MMMU eval/eval_utils.py): the tail after the last key phrase
    of each sentence ("is", "so", "therefore", "answer", "=" in the last one), the numbers in them, each
    normalised; the whole response when no sentence has a key phrase."""
    body = text.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", body)
    keys = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    tails = []
    for index, sentence in enumerate(sentences):
        indicators = keys + (["="] if index == len(sentences) - 1 else [])
        shortest = None
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                if shortest is None or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            tails.append(shortest)
    tails = tails or [body]
    found = list(tails)
    for tail in tails:
        found.extend(_mmmu_numbers(tail))
    out = []
    for item in found:
        for norm in _mmmu_normalise(item):
            if norm not in out:
                out.append(norm)
    return out


def _mmmu_open(response: str, fields: Mapping, mode: str) -> ScoreResult:
    raw = _gold(fields)
    golds = _options({"answer": raw}, "answer") if raw.startswith("[") else [raw]
    spans = candidates(response)
    if not spans:
        return _result(False, None, "none", mode, detail="no answer in the response")
    if mode == "official":
        # eval_open: a number must equal a gold rounded to 2 decimals; a gold string inside a parsed string
        marked = [c for c in spans if c.rule in ("answer_tag", "boxed")]
        text = marked[0].text if marked else strip_think(response)
        preds = mmmu_open_predictions(text)
        norm_golds = [n for g in golds for n in _mmmu_normalise(g)]
        for pred in preds:
            if isinstance(pred, str):
                if any(isinstance(g, str) and g in pred for g in norm_golds):
                    return _result(True, pred, "mmmu_open/substring", mode)
            elif pred in norm_golds:
                return _result(True, format_value(pred), "mmmu_open/number", mode)
        return _result(False, str(preds[0]) if preds else None, "mmmu_open", mode)
    # strict: the stated answer equals a reference (numbers rounded to 2 decimals, text exactly)
    value, rule, span = value_from_candidates(spans)
    for gold in golds:
        gold_value = parse_number(gold)
        if gold_value is not None and value is not None and round(value, 2) == round(gold_value, 2):
            return _result(True, format_value(value), rule + "; round(2)", mode)
        for c in spans:
            if c.rule != "full" and normalise_text(c.text) == normalise_text(gold):
                return _result(True, c.text, c.rule + "/text", mode)
        if normalise_text(spans[-1].text) == normalise_text(gold):
            return _result(True, spans[-1].text, "full/text", mode)
    extracted = format_value(value) if value is not None else spans[0].text
    return _result(False, extracted, rule if value is not None else spans[0].rule, mode)


def score_mmmu(response: str, fields: Mapping, mode: str, latex=None) -> ScoreResult:
    """MMMU (MMMU-Benchmark/MMMU eval/eval_utils.py): multiple choice by parse_multi_choice_response, here the
    stronger `extraction.read_choice` over the candidate spans, with the official random pick when no letter
    is found (official: seeded per sample and flagged; strict: wrong); open questions by parse_open_response
    and eval_open (official: a number equal to a reference after rounding to 2 decimals, or a reference
    string inside a parsed answer, read from the <answer> tag or the box when there is one, else from the
    response without its <think> block; strict: the stated answer equals a reference)."""
    if fields.get("question_type") == "open" or not _options(fields, "options"):
        return _mmmu_open(response, fields, mode)
    return _mmmu_choice(response, fields, mode, "mmmu")


def score_mmmu_pro(response: str, fields: Mapping, mode: str, latex=None) -> ScoreResult:
    """MMMU-Pro (MMMU-Benchmark/MMMU mmmu-pro/evaluate.py, mmmu_process_results and
    parse_multi_choice_response): multiple choice only, the MMMU rule with up to ten options, the random pick
    included (official: seeded and flagged; strict: wrong)."""
    return _mmmu_choice(response, fields, mode, "mmmu_pro")


# --- MMStar -----------------------------------------------------------------------------------------------


def mmstar_options(question: str) -> List[str]:
    """Option texts from an MMStar question ("Options: A: red, B: blue, …"), or [] when they cannot be read."""
    m = re.search(r"Options?\s*:\s*(.*)$", question, re.DOTALL)
    if not m:
        return []
    parts = re.split(r"(?:^|,\s*|\n)\s*([A-J])\s*[:.]\s*", m.group(1))
    letters, texts = parts[1::2], [t.strip().rstrip(",").strip() for t in parts[2::2]]
    if letters != list(OPTION_LETTERS[: len(letters)]) or len(letters) < 2:
        return []
    return texts


def score_mmstar(response: str, fields: Mapping, mode: str, latex=None) -> ScoreResult:
    """MMStar (evaluated with VLMEvalKit: vlmeval/utils/matching_util.py, can_infer_option / can_infer_text;
    lmms-eval tasks/mmstar/utils.py, exact_match, reads only the first character): the option letter the
    answer gives, or the option whose text it gives (options read from the question when present). The same
    in both modes (no guess)."""
    options = mmstar_options(str(fields.get("question", "")))
    n = len(options) if options else int(fields.get("num_options") or 4)
    gold_letter = _letter_of(_gold(fields), max(n, 2))
    letter, rule, _ = choice_from_candidates(candidates(response), max(n, 2), options or None)
    return _result(letter == gold_letter, letter, rule, mode)


# --- HallusionBench ---------------------------------------------------------------------------------------


def score_hallusionbench(response: str, fields: Mapping, mode: str, latex=None) -> ScoreResult:
    """HallusionBench: yes/no by VLMEvalKit's YOrN_Extraction (vlmeval/dataset/utils/yorn.py; the word
    anywhere, unknown when both or neither), read from the candidate spans in order; the reference from
    ``gt_answer`` (1 yes, 0 no) or ``answer``. The official assign_correctness (HallusionBench utils.py; lmms-eval
    tasks/hallusion_bench/evaluate_hb.py) counts an unclear answer as right on a VS question without a figure
    (figure_id 0): official, any unknown; strict, only an answer with neither word (a hedge "yes or no" is
    wrong)."""
    if "gt_answer" in fields and fields["gt_answer"] is not None:
        gt = str(fields["gt_answer"]).strip()
        if gt not in ("0", "1"):
            raise ValueError("fields: gt_answer %r is not 0 (no) or 1 (yes)" % gt)
        gold = "yes" if gt == "1" else "no"
    else:
        gold = normalise_text(_gold(fields))
        if gold not in ("yes", "no"):
            raise ValueError("fields: answer %r is not yes or no" % gold)
    spans = candidates(response)
    said, rule, span = yes_no_from_candidates(spans)
    if said != "unknown":
        return _result(said == gold, said, rule + "/yorn", mode)
    no_figure = str(fields.get("category", "")) == "VS" and str(fields.get("figure_id", "")).strip() == "0"
    if no_figure:
        hedge = not neither_yes_nor_no(strip_think(response))
        ok = mode == "official" or not hedge
        return _result(ok, "unknown", "unclear_without_figure", mode, flagged=hedge and ok)
    return _result(False, "unknown", "yorn", mode, detail="neither or both of yes / no")


SCORERS: Dict[str, Callable[..., ScoreResult]] = {
    "mathvista": score_mathvista,
    "mathvision": score_mathvision,
    "mathverse": score_mathverse,
    "mmmu": score_mmmu,
    "mmmu_pro": score_mmmu_pro,
    "mmstar": score_mmstar,
    "hallusionbench": score_hallusionbench,
}


def score(
    benchmark: str,
    response: str,
    fields: Mapping,
    mode: str = "official",
    latex: Optional[LatexChecker] = None,
) -> ScoreResult:
    """Score one response by `benchmark`'s official rule (`mode` official or strict, see the module)."""
    key = str(benchmark).strip().lower().replace("-", "_")
    if key not in SCORERS:
        raise ValueError("benchmark: expected one of %s, got %r" % (", ".join(BENCHMARK_NAMES), benchmark))
    if mode not in MODES:
        raise ValueError("mode: expected official or strict, got %r" % (mode,))
    if not isinstance(response, str):
        raise TypeError("response: expected a str, got %s" % type(response).__name__)
    if not isinstance(fields, Mapping):
        raise TypeError("fields: expected a mapping of the sample's columns, got %s" % type(fields).__name__)
    try:
        return SCORERS[key](response, fields, mode, latex)
    except ValueError as exc:
        if str(exc).startswith("fields:"):
            return ScoreResult(False, None, "none", mode, False, ERROR, str(exc))
        raise


__all__ = ["MODES", "BENCHMARK_NAMES", "SCORERS", "ScoreResult", "score", "mmmu_guess", "Candidate"]
