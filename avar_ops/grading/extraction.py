"""Reading the final answer out of a model's response: candidate spans, each with the rule that produced it.

`candidates(response)` returns every span that may hold the final answer, most explicit first:

==============  ==========================================================================================
rule            span
==============  ==========================================================================================
answer_tag      the last non-empty ``<answer>…</answer>`` (R1-style ``<think>…</think><answer>…</answer>``)
boxed           the last outermost ``\\boxed{…}`` / ``\\fbox{…}`` (nested braces and boxes read as one)
answer_is       the text after a word-bounded "(final) answer is / : / =" (the last one that is not empty)
bold            the last markdown ``**…**`` span
therefore       the conclusion of the last "Therefore, …" / "Thus, …" / "Hence, …" / "So, …" sentence
full            the whole response (without the ``<think>`` part)
==============  ==========================================================================================

A rule that finds nothing, or only an empty span, yields no candidate, so the next rule is tried: an answer
phrase at the very end of a sentence ("… to find the answer.") never ends the search with an empty answer.

Readers on top of the spans: `read_choice` (an option letter, at least as strong as MMMU's
``parse_multi_choice_response``: letters in ``\\boxed{\\text{B}}``, "B is correct", a final choice after
discarded ones, "not A; it is B", an option's text), `yes_no` (VLMEvalKit's ``YOrN_Extraction``).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

MAX_OPTIONS = 10
OPTION_LETTERS = string.ascii_uppercase[:MAX_OPTIONS]
RULES = ("answer_tag", "boxed", "answer_is", "bold", "therefore", "full")
DECISIVE = ("answer_tag", "boxed", "answer_is")  # a non-empty span of these is the model's stated answer


@dataclass(frozen=True)
class Candidate:
    text: str
    rule: str  # one of RULES


# --- spans ------------------------------------------------------------------------------------------------

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "answer" as a word, with a connector: "The answer is", "Final answer:", "**Answer:**", "answer = "
_ANSWER_IS = re.compile(
    r"(?<![A-Za-z])(?:final\s+|correct\s+)?answer(?:\s+(?:to\s+(?:this|the)\s+question|choice|option))?\**"
    r"\s*(?:is\s*:?|:|：|=|should\s+be|would\s+be|will\s+be|must\s+be)\s*\**",
    re.IGNORECASE,
)
_SEEKING = re.compile(
    r"\b(?:find|get|determine|reach|obtain|compute|calculate|know|check|verify|justify)\s+(?:the\s+|an\s+|our\s+)?$",
    re.IGNORECASE,
)
_BOLD = re.compile(r"\*\*(.+?)\*\*", re.DOTALL)
_THEREFORE = re.compile(r"(?:^|[.!?]\s+|\n)\s*(?:therefore|thus|hence|so)\s*,?\s+(.+?)(?:\.(?:\s|$)|\n|$)", re.I)


def strip_think(response: str) -> str:
    """The response without its reasoning block (``<think>…</think>``, or all before a lone ``</think>``)."""
    text = _THINK.sub(" ", response)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.strip()


def boxes(text: str) -> List[str]:
    """Contents of the outermost ``\\boxed{…}`` spans with balanced braces, in order (nested ones are part
    of their outer box); an unclosed box is ignored."""
    out = []
    pos = 0
    while True:
        m = _BOX_START.search(text, pos)
        if m is None:
            return out
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:
            pos = m.end()
            continue
        out.append(text[m.end() : j - 1].strip())
        pos = j


def last_boxed(text: str) -> Optional[str]:
    """The content of the last outermost box, with a box directly inside it unwrapped; None without one."""
    found = boxes(text)
    if not found:
        return None
    inner = found[-1]
    while True:
        nested = boxes(inner)
        if len(nested) == 1 and re.fullmatch(r"\\(?:boxed|fbox)\s*\{.*\}", inner, re.DOTALL):
            inner = nested[0]
        else:
            return inner


def clean_span(text: str) -> str:
    """A span without the wrappers around an answer: box, markdown bold, ``$``, ``\\( \\)``, final period."""
    s = text.strip()
    for _ in range(3):
        before = s
        boxed = last_boxed(s)
        if boxed is not None and re.fullmatch(r"\s*\\(?:boxed|fbox)\s*\{.*\}\s*", s, re.DOTALL):
            s = boxed
        s = s.strip().strip("*").strip()
        if len(s) >= 2 and s[0] == s[-1] == "$":
            s = s.strip("$").strip()
        s = re.sub(r"^\\\(\s*(.*?)\s*\\\)$", r"\1", s, flags=re.DOTALL)
        s = re.sub(r"^\\\[\s*(.*?)\s*\\\]$", r"\1", s, flags=re.DOTALL)
        s = s.rstrip(".").strip()
        if s == before:
            break
    return s


def _answer_is_spans(text: str) -> List[str]:
    spans = []
    for m in _ANSWER_IS.finditer(text):
        if _SEEKING.search(text[max(0, m.start() - 30) : m.start()]):
            continue  # "To find the answer: we count …" announces work, not the answer
        rest = text[m.end() :]
        line = rest.split("\n", 1)[0]
        if not line.strip() and "\n" in rest:  # "The answer is:\n\n**B**": the next non-empty line
            following = [x for x in rest.split("\n") if x.strip()]
            line = following[0] if following else ""
        spans.append(clean_span(line))
    return spans


def _therefore_span(text: str) -> Optional[str]:
    matches = list(_THEREFORE.finditer(text))
    for m in reversed(matches):
        clause = m.group(1).strip()
        # "Therefore, the area is 12 cm^2": the conclusion is what the clause says the thing is
        tail = re.split(r"\s(?:is|are|equals|was|be|of)\s|=|\\approx|≈", clause)[-1]
        span = clean_span(tail if tail.strip() else clause)
        if span:
            return span
    return None


def candidates(response: str) -> List[Candidate]:
    """Every span that may hold the final answer, most explicit rule first (see the module's table)."""
    if not isinstance(response, str):
        raise TypeError("response: expected a str, got %s" % type(response).__name__)
    out: List[Candidate] = []
    for tag in reversed(_ANSWER_TAG.findall(response)):
        span = clean_span(tag)
        if span:
            out.append(Candidate(span, "answer_tag"))
            break
    body = re.sub(r"</?answer>", " ", strip_think(response), flags=re.IGNORECASE).strip()
    boxed = last_boxed(body)
    if boxed is not None and clean_span(boxed):
        out.append(Candidate(clean_span(boxed), "boxed"))
    for span in reversed(_answer_is_spans(body)):
        if span:
            out.append(Candidate(span, "answer_is"))
            break
    bold = [clean_span(b) for b in _BOLD.findall(body)]
    bold = [b for b in bold if b and not re.fullmatch(r"(?:final\s+)?answer\s*:?", b, re.I)]
    if bold:
        out.append(Candidate(bold[-1], "bold"))
    therefore = _therefore_span(body)
    if therefore:
        out.append(Candidate(therefore, "therefore"))
    if clean_span(body):
        out.append(Candidate(clean_span(body), "full"))
    return out


# --- multiple choice --------------------------------------------------------------------------------------


def _letters(num_options: int) -> str:
    if not 2 <= num_options <= MAX_OPTIONS:
        raise ValueError("num_options: expected 2..%d, got %r" % (MAX_OPTIONS, num_options))
    return OPTION_LETTERS[:num_options]


def normalise_text(text: str) -> str:
    text = re.sub(r"\\text(?:bf|rm)?\s*\{([^{}]*)\}", r"\1", str(text))
    text = text.lower().strip()
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r" ?, ?", ",", text)  # "[1, 2]" and "[1,2]" are the same list
    return text.strip(" .,:;!?\"'`*()[]$")


def _unwrap_letter_markup(text: str) -> str:
    # \boxed{\text{B}}, \textbf{(B)}, \mathrm{B}, **B**: the letter inside
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|rm|bf)\s*\{([^{}]*)\}", r"\1", text)
    return s.replace("**", "")


def _negated(text: str, start: int, end: int) -> bool:
    """Whether the letter at text[start:end] is named to be discarded: "not A", "A is wrong", "rule out (A)"."""
    before = text[max(0, start - 40) : start].lower()
    after = text[end : end + 40].lower()
    if re.search(
        r"(?:\bnot|n't|\bisn't|\bexclude|\beliminate|\brule\s+out|\brules\s+out|\bruled\s+out|\brather\s+than|"
        r"\binstead\s+of|\bneither|\bnor|\bagainst)\s*(?:option\s*|choice\s*)?[\(\[]?\s*$",
        before,
    ):
        return True
    return bool(
        re.match(
            r"^[\)\]]?\s*(?:is|are|was|seems|would\s+be)?\s*(?:not\s+correct|incorrect|wrong|false|"
            r"eliminated|ruled\s+out|excluded|impossible|not\s+possible|unlikely|too\s+(?:small|large|big)|not\s+the\s+(?:correct\s+)?answer|can\s+be\s+ruled|cannot\s+be)",
            after,
        )
    )


_LETTER_VERBS = re.compile(
    r"^\s+(?:is|was|would|seems|should|must|could|and|or|nor|because|since|as|then|fits|matches|looks|appears|"
    r"gives|shows|has|best|correctly)\b"
)


def _is_word(letter: str, after: str) -> bool:
    """ "A cat", "I think": the article or the pronoun, not an option ("A is correct", "I and J" are options)."""
    return letter in "AI" and re.match(r"^\s+[a-z]", after) is not None and not _LETTER_VERBS.match(after)


def _letter_mentions(text: str, letters: str) -> List[Tuple[int, str, int]]:
    """(position, letter, strength) of every standalone option letter; strength 2 for an explicit pick
    ("B is correct", "choose B", "option B"), 1 for a bracketed or listed letter, 0 for a bare capital."""
    out = []
    for m in re.finditer(r"(?<![A-Za-z0-9\\])[\(\[]?([%s])[\)\]]?(?![A-Za-z0-9])" % letters, text):
        letter = m.group(1)
        bracketed = m.group(0)[0] in "([" and m.group(0)[-1] in ")]"
        after = text[m.end() : m.end() + 40]
        before = text[max(0, m.start() - 40) : m.start()]
        if not bracketed and _is_word(letter, after):
            continue
        if _negated(text, m.start(), m.end()):
            continue
        strength = 0
        if re.match(r"^\s*(?:is|would\s+be|seems)\s+(?:the\s+)?(?:correct|right|best|answer)", after, re.I):
            strength = 2
        elif re.search(
            r"(?:answer|option|choice|choose|select|pick|go\s+with)\s*(?:is|:)?\s*(?:option\s*)?$", before, re.I
        ):
            strength = 2
        elif bracketed or re.match(r"^[.:)]", text[m.end() : m.end() + 1]):
            strength = 1
        out.append((m.start(), letter, strength))
    return out


def read_choice(text: str, num_options: int, options: Optional[Sequence[str]] = None) -> Tuple[Optional[str], str]:
    """The option letter a span names, and how it was read: (letter or None, rule).

    Rules, in order: ``whole`` (the span is a letter: "B", "(B)", "\\text{B}", "**B**"); ``leading`` ("B. 42",
    "(B) 42", "B because …"); ``explicit`` (the last "B is correct" / "answer is B" / "choose B" / "option B"
    not negated); ``mention`` (the last bracketed or listed letter, then the last bare capital letter, negated
    ones skipped); ``option_text`` (the span equals one option's text, else the option texts it mentions, the
    last one not negated).
    """
    letters = _letters(num_options)
    s = _unwrap_letter_markup(text).strip()
    whole = re.fullmatch(r"[\(\[]?\s*([%s])\s*[\)\]]?[.:]?" % letters, s, re.IGNORECASE)
    if whole and (s.isupper() or len(s) > 1 or s in letters.lower()):
        return whole.group(1).upper(), "whole"
    lead = re.match(r"[\(\[]?([%s])(?:[\)\]][.:]?|[.:])?(?=\s|$)" % letters, s)
    if lead and not _is_word(lead.group(1), s[lead.end() :]) and not _negated(s, 0, lead.end()):
        return lead.group(1), "leading"
    mentions = _letter_mentions(s, letters)
    for strength, rule in ((2, "explicit"), (1, "mention"), (0, "mention")):
        chosen = [m for m in mentions if m[2] == strength]
        if chosen:
            return chosen[-1][1], rule
    if options:
        if len(options) != num_options:
            raise ValueError("options: expected %d option texts, got %d" % (num_options, len(options)))
        haystack = normalise_text(s)
        for letter, option in zip(letters, options):
            if normalise_text(option) and haystack == normalise_text(option):
                return letter, "option_text"
        found = []
        for letter, option in zip(letters, options):
            needle = normalise_text(option)
            if not needle:
                continue
            for m in re.finditer(r"(?<!\w)%s(?!\w)" % re.escape(needle), haystack):
                if not _negated(haystack, m.start(), m.end()):
                    found.append((m.start(), letter))
        if found:
            return max(found)[1], "option_text"
    return None, "none"


def choice_from_candidates(
    spans: Sequence[Candidate], num_options: int, options: Optional[Sequence[str]] = None
) -> Tuple[Optional[str], str, Optional[Candidate]]:
    """The letter of the first candidate that names one: (letter, "<span rule>/<letter rule>", candidate)."""
    for c in spans:
        letter, how = read_choice(c.text, num_options, options)
        if letter is not None:
            return letter, "%s/%s" % (c.rule, how), c
    return None, "none", spans[0] if spans else None


# --- yes / no ---------------------------------------------------------------------------------------------

_YN_PUNCT = ';/[]"{}()=+\\_->`<@,?!'


def _words(text: str) -> List[str]:
    s = text.lower()
    # VLMEvalKit's process_punctuation: punctuation becomes a space (or vanishes), periods not inside numbers go
    for p in _YN_PUNCT:
        s = s.replace(p, " ")
    s = re.sub(r"(?<!\d)\.(?!\d)", " ", s)
    return s.split()


def yes_no(text: str) -> str:
    """VLMEvalKit's YOrN_Extraction (vlmeval/dataset/utils/yorn.py): "yes" if the word yes appears and no
    does not, "no" for the reverse, "unknown" when both or neither appear."""
    words = _words(text)
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes and not has_no:
        return "yes"
    if has_no and not has_yes:
        return "no"
    return "unknown"


def yes_no_from_candidates(spans: Sequence[Candidate]) -> Tuple[str, str, Optional[Candidate]]:
    """The first candidate that says yes or no: (yes | no | unknown, rule, candidate)."""
    for c in spans:
        said = yes_no(c.text)
        if said != "unknown":
            return said, c.rule, c
    return "unknown", "none", spans[-1] if spans else None


def neither_yes_nor_no(text: str) -> bool:
    words = _words(text)
    return "yes" not in words and "no" not in words


# --- numbers ----------------------------------------------------------------------------------------------


def value_from_candidates(spans: Sequence[Candidate]) -> Tuple[Optional[float], str, Optional[Candidate]]:
    """The value of the first candidate whose whole answer is a number: (value, rule, candidate).

    A marked span (tag, box, answer phrase, bold, conclusion) is read whole or from its start ("12 because …");
    the full response, read only when no marked span holds a number, gives the last whole expression of its
    last sentence that has one, parsed in full (``2\\sqrt{3}`` stays 3.46)."""
    from avar_ops.grading.values import evaluate, leading_value, values_in  # noqa: F401

    for c in spans:
        if c.rule == "full":
            terse = re.match(r"^\s*([^\n]{1,40}?)\s*,?\s+(?:because|since|as)\b", c.text, re.IGNORECASE)
            value = evaluate(terse.group(1)) if terse else None
            if value is not None:  # "5 because 2 + 3 = 5, not 6": the value stated first, then the reasons
                return value, "full/stated_value", c
            sentences = [x for x in re.split(r"(?<=[.!?])\s+|\n", c.text) if x.strip()]
            for sentence in reversed(sentences):
                found = values_in(sentence)
                if found:
                    return found[-1][1], "full/last_value", c
            continue
        value = evaluate(c.text)
        if value is not None:
            return value, "%s/value" % c.rule, c
        value = leading_value(c.text)
        if value is not None:
            return value, "%s/leading_value" % c.rule, c
        if c.rule == "answer_is":  # "the answer is the length of AB, which is 5"
            tail = re.split(r"\s(?:is|are|equals|be)\s", c.text)[-1]
            value = leading_value(tail) if tail != c.text else None
            if value is not None:
                return value, "answer_is/tail_value", c
        if c.rule in DECISIVE:
            return None, "%s/not_a_number" % c.rule, c  # a stated answer that is not a number is not one
    return None, "none", spans[0] if spans else None
