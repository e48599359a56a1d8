"""The numeric value of a whole answer: a small parser for plain and LaTeX arithmetic.

A number is read from the whole answer, never from a digit run inside it: ``2\\sqrt{3}`` is 3.464 (not 2 or 3),
``\\frac{\\sqrt{2}}{2}`` is 0.707, ``3 \\times 10^{5}`` and ``3e5`` are 300000, ``4\\pi`` is 12.566. A trailing
unit is dropped first, exponents included (``cm^2``, ``m/s^2``, ``\\text{cm}^{2}``, ``\\mathrm{m/s^2}``), as are
degrees, ``%`` and currency signs.

- `evaluate(text)`: the value of the whole text, or None when any of it is not arithmetic (``x+1``, ``3 and 4``);
- `leading_value(text)`: the value of the expression the text starts with ("12 because 3 x 4 = 12" is 12);
- `parse_number(text)`: like `evaluate` but for literal numbers only (decimals, thousands commas, fractions of
  two numbers), which is what decides that a reference is a plain number rather than an expression.
"""

from __future__ import annotations

import math
import re
from typing import List, Optional, Tuple

# --- units ------------------------------------------------------------------------------------------------

_UNIT_WORDS = (
    "mm cm dm m km in ft yd mi mg g kg lb lbs oz t ms s sec min h hr hrs ns us ml mL l L N kN J kJ W kW V mV A mA "
    "Hz kHz MHz Pa kPa atm mol K C F Ω ohm ohms rad deg degree degrees unit units sq dollars dollar cents percent "
    "m² m³ cm² cm³"
).split()
_UNIT = r"(?:%s)" % "|".join(sorted((re.escape(u) for u in _UNIT_WORDS), key=len, reverse=True))
_POWER = r"(?:\s*\^\s*\{?\s*-?\d\s*\}?|[²³])?"
_SIMPLE_UNIT = r"(?:%s%s)" % (_UNIT, _POWER)
# cm, cm^2, m/s^2, kg*m/s^2, N·m
_COMPOUND = r"%s(?:\s*(?:/|\*|·|\\cdot)\s*%s)*" % (_SIMPLE_UNIT, _SIMPLE_UNIT)
_LATEX_UNIT = r"\\(?:text|mathrm|mbox|rm|textrm)\s*\{(?:[^{}]|\{[^{}]*\})*\}%s" % _POWER
_UNIT_TAIL = re.compile(
    r"(?:\s|\\,|\\;|\\ |~)*(?:%s|(?<![A-Za-z\\])%s|(?<=\d)\s*[A-Za-z][a-z]{2,}(?:\s+[a-z]{3,}){0,2})\s*$"
    % (_LATEX_UNIT, _COMPOUND)
)


def strip_units(text: str) -> str:
    """The text without a trailing unit (repeatedly: ``12\\,\\text{cm}^2`` -> ``12``), degrees, % or currency."""
    s = text.strip()
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "").replace("°", "")
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"^(?:\\\$|\$|€|£|¥|USD\s*)\s*", "", s)
    for _ in range(3):
        stripped = _UNIT_TAIL.sub("", s).strip()
        if stripped == s or not stripped:
            break
        s = stripped
    return s.strip()


# --- tokens -----------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s+|(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|\d+\.\d*|\.\d+|\d+)(?P<exp>[eE][-+]?\d+)?"
    r"|(?P<cmd>\\[A-Za-z]+)|(?P<op>[-+*/^(){}\[\]×·÷−–]|π|√)|(?P<skip>\\[,;!: ]|\\left|\\right)"
)
_IGNORED_COMMANDS = {"\\left", "\\right", "\\displaystyle", "\\mathrm", "\\,", "\\;", "\\!", "\\ "}
_COMMANDS = {
    "\\times": "*",
    "\\cdot": "*",
    "\\div": "/",
    "\\pi": "pi",
    "\\frac": "frac",
    "\\dfrac": "frac",
    "\\tfrac": "frac",
    "\\sqrt": "sqrt",
}


def _tokens(text: str) -> Tuple[List[Tuple[str, object, int]], int]:
    """Tokens of the arithmetic the text starts with, and where they end (the first character not read)."""
    out: List[Tuple[str, object]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            break
        if m.group("num") is not None:
            value = float(m.group("num").replace(",", "") + (m.group("exp") or ""))
            out.append(("num", value, m.end()))
        elif m.group("cmd") is not None:
            cmd = m.group("cmd")
            if cmd in _COMMANDS:
                name = _COMMANDS[cmd]
                out.append(("op", name, m.end()) if name in "*/" else (name, None, m.end()))
            elif cmd not in _IGNORED_COMMANDS:
                break
        elif m.group("op") is not None:
            op = {"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-", "π": "pi", "√": "sqrt"}.get(m.group("op"))
            op = op or m.group("op")
            out.append((op, None, m.end()) if op in ("pi", "sqrt") else ("op", op, m.end()))
        pos = m.end()
    return out, pos


class _Parser:
    """Recursive descent over the tokens; `end` is how many tokens the parsed expression used."""

    def __init__(self, tokens, literal_only: bool):
        self.tokens = tokens
        self.i = 0
        self.literal_only = literal_only

    def peek(self):
        return self.tokens[self.i][:2] if self.i < len(self.tokens) else (None, None)

    def take(self, kind, value=None) -> bool:
        k, v = self.peek()
        if k == kind and (value is None or v == value):
            self.i += 1
            return True
        return False

    def expression(self) -> float:
        value = self.term()
        while True:
            if self.take("op", "+"):
                value += self.term()
            elif self.take("op", "-"):
                value -= self.term()
            else:
                return value

    def term(self) -> float:
        value = self.unary()
        while True:
            if self.take("op", "*"):
                value *= self.unary()
            elif self.take("op", "/"):
                divisor = self.unary()
                if divisor == 0:
                    raise ValueError("division by zero")
                value /= divisor
            elif self._starts_implicit_factor():
                value *= self.power()
            else:
                return value

    def _starts_implicit_factor(self) -> bool:
        # 2\sqrt{3}, 4\pi, 3(2+1): a factor that is not a bare number ("2 3" is not a product)
        if self.literal_only:
            return False
        k, v = self.peek()
        return k in ("pi", "sqrt", "frac") or (k == "op" and v in ("(", "{"))

    def unary(self) -> float:
        if self.take("op", "-"):
            return -self.unary()
        if self.take("op", "+"):
            return self.unary()
        return self.power()

    def power(self) -> float:
        base = self.atom()
        if self.take("op", "^"):
            if self.literal_only:
                raise ValueError("power in a literal")
            exponent = self.unary()
            if abs(exponent) > 1000 or (abs(base) > 1 and abs(exponent) * math.log10(abs(base)) > 300):
                raise ValueError("too large")
            return float(base) ** exponent
        return base

    def group(self) -> float:
        if self.take("op", "{"):
            value = self.expression()
            if not self.take("op", "}"):
                raise ValueError("unclosed brace")
            return value
        k, v = self.peek()
        if k == "num":  # \frac12
            self.i += 1
            return v
        return self.atom()

    def atom(self) -> float:
        k, v = self.peek()
        if k == "num":
            self.i += 1
            return v
        if k == "frac":
            self.i += 1
            num = self.group()
            den = self.group()
            if den == 0:
                raise ValueError("division by zero")
            return num / den
        if self.literal_only:
            raise ValueError("not a literal")
        if k == "pi":
            self.i += 1
            return math.pi
        if k == "sqrt":
            self.i += 1
            degree = 2.0
            if self.take("op", "["):
                degree = self.expression()
                if not self.take("op", "]"):
                    raise ValueError("unclosed root degree")
            radicand = self.group()
            if radicand < 0 or degree == 0:
                raise ValueError("no real root")
            return radicand ** (1.0 / degree)
        for opening, closing in (("(", ")"), ("{", "}")):
            if self.take("op", opening):
                value = self.expression()
                if not self.take("op", closing):
                    raise ValueError("unclosed bracket")
                return value
        raise ValueError("no value")


def _parse(tokens, literal_only: bool = False, whole: bool = True) -> Optional[Tuple[float, int]]:
    if not tokens:
        return None
    parser = _Parser(tokens, literal_only)
    try:
        value = parser.expression()
    except (ValueError, OverflowError, ZeroDivisionError):
        return None
    if whole and parser.i != len(tokens):
        return None
    if not math.isfinite(value):
        return None
    return value, parser.i


def _clean(text: str) -> str:
    s = text.strip().strip("*").strip()
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    if len(s) >= 2 and s[0] == s[-1] == "$":
        s = s.strip("$").strip()
    s = re.sub(r"\\(?:boxed|text|mathrm|mathbf|textbf)\s*\{\s*([-+\d.,\s]*)\}", r"\1", s)
    s = s.replace("\\!", "").replace("{,}", ",")
    return s.rstrip(".").strip()


def _right_of_equals(s: str) -> str:
    # "x = 5", "AB \approx 4.2": the value is what stands after the last (approximate) equals sign
    parts = re.split(r"=|\\approx|≈", s)
    return parts[-1].strip() if len(parts) > 1 else s


def evaluate(text: str, literal_only: bool = False) -> Optional[float]:
    """The value of the whole text (units, degrees, % and a leading "x =" dropped), else None."""
    if not isinstance(text, str):
        return None
    s = _right_of_equals(_clean(text))
    s = strip_units(s)
    if not s:
        return None
    tokens, end = _tokens(s)
    if end != len(s):
        return None
    parsed = _parse(tokens, literal_only)
    return None if parsed is None else parsed[0]


def parse_number(text: str) -> Optional[float]:
    """A literal number written alone (possibly with units, %, $, thousands commas or a fraction of two
    numbers); None for expressions such as ``\\sqrt{2}`` or ``2^3``."""
    return evaluate(text, literal_only=True)


def leading_value(text: str) -> Optional[float]:
    """The value of the arithmetic the text starts with, when what follows it is words, not more math:
    "12 because 3 x 4 = 12" is 12, "12 cm^2 in total" is 12, "x + 1" is None."""
    s = _right_of_equals(_clean(text)) if re.match(r"^\s*[A-Za-z]\s*=", text) else _clean(text)
    s = re.sub(r"^(?:\\\$|\$|€|£|¥)\s*", "", s)
    whole = evaluate(s)
    if whole is not None:
        return whole
    tokens, _ = _tokens(s)
    parsed = _parse(tokens, whole=False)
    if parsed is None or parsed[1] != len(tokens):
        return None  # nothing read, or the formula goes on with more math than could be read
    rest = s[tokens[-1][2] :]
    rest = (
        re.sub(r"^\s*%s(?![A-Za-z])" % _COMPOUND, "", rest)
        if re.match(r"^\s*%s(?![A-Za-z])" % _COMPOUND, rest)
        else rest
    )
    # what follows must be words or the end of a clause, not more of the formula (2x, 3y, x_1)
    if rest.strip() and not re.match(r"^(?:\s*[,;:.!?)]|\s+[A-Za-z]{2,}|\s+\()", rest):
        return None
    return parsed[0]


def values_in(text: str) -> List[Tuple[int, float]]:
    """(position, value) of every whole arithmetic expression in a text, left to right, each read in full."""
    out = []
    pos = 0
    # an exponent (cm^2, ^{2}) or an index (x_1) is part of what precedes it, not a value of its own
    starts = re.compile(r"(?<![\w.^_])(?<!\^\{)(?:-\s*)?(?:\d|\.\d|\\frac|\\dfrac|\\tfrac|\\sqrt|\\pi|π|√)")
    while True:
        m = starts.search(text, pos)
        if m is None:
            return out
        tokens, end = _tokens(text[m.start() :])
        parsed = _parse(tokens, whole=False)
        if parsed is None:
            pos = m.end()
            continue
        consumed = tokens[parsed[1] - 1][2]
        out.append((m.start(), parsed[0]))
        pos = m.start() + max(consumed, 1)


def format_value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(round(value, 10))
