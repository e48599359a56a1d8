"""The extraction module's candidate spans and rules, the value parser, and the yes/no reader on direct inputs
(the scoring corpus tests them through the benchmark scorers)."""

import math

import pytest

from avar_ops.grading.extraction import candidates, last_boxed, read_choice, yes_no
from avar_ops.grading.values import evaluate, leading_value, parse_number, strip_units


def _rules(response):
    return [(c.rule, c.text) for c in candidates(response)]


def test_candidates_in_rule_order():
    got = _rules("<think>maybe 3</think>So the answer is **5**. Therefore, x is 5.<answer>5</answer>")
    assert [r for r, _ in got] == ["answer_tag", "answer_is", "bold", "therefore", "full"]
    assert got[0] == ("answer_tag", "5")
    assert all("maybe" not in t for _, t in got)  # the reasoning block is never a candidate


def test_empty_spans_fall_through():
    assert _rules("<answer>  </answer> \\boxed{7}")[0] == ("boxed", "7")
    # an answer phrase at the very end, or one that announces work, yields no candidate
    assert [r for r, _ in _rules("We need the answer.")] == ["full"]
    assert [r for r, _ in _rules("To find the answer: count them. There are 6.")] == ["full"]
    assert _rules("The answer is:\n\n**B**")[0] == ("answer_is", "B")
    assert candidates("   ") == []


def test_answer_needs_word_bounds():
    assert [r for r, _ in _rules("The answered question was hard; answers: none")] == ["full"]
    assert _rules("Final Answer: 12")[0] == ("answer_is", "12")


def test_outermost_last_box():
    assert last_boxed("\\boxed{1} then \\boxed{2 + \\boxed{3}}") == "2 + \\boxed{3}"
    assert last_boxed("\\boxed{\\boxed{4}}") == "4"  # a box directly inside a box is unwrapped
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("\\fbox{\\frac{1}{2}}") == "\\frac{1}{2}"


@pytest.mark.parametrize(
    "text, letter, rule",
    [
        ("\\text{B}", "B", "whole"),
        ("(C) 42", "C", "leading"),
        ("B is correct.", "B", "leading"),
        ("I think option B is correct.", "B", "explicit"),
        ("Not A; it is B.", "B", "mention"),
        ("(A) is wrong, (B) is wrong, so (D).", "D", "mention"),
        ("I choose C, not D", "C", "explicit"),
        ("A cat sits on the mat", None, "none"),
        ("I think A is correct.", "A", "explicit"),
        ("A is correct.", "A", "leading"),
        ("In triangle ABC, a cat would say A and then C.", "C", "mention"),
        # several letters of one strength: the last one is the final choice
        ("I first thought (A), but after measuring it is more like (C)", "C", "mention"),
        ("Option A looks fine at first, but option C is correct.", "C", "explicit"),
        ("Maybe A, then B, finally D", "D", "mention"),
    ],
)
def test_read_choice(text, letter, rule):
    assert read_choice(text, 4) == (letter, rule)


def test_read_choice_by_option_text():
    options = ["red", "green", "blue", "white"]
    assert read_choice("Green", 4, options) == ("B", "option_text")
    assert read_choice("It is not red, it is white.", 4, options) == ("D", "option_text")
    # several option texts named, none negated: the last one is the final choice
    assert read_choice("At first it looked red, but in the end it is white.", 4, options) == ("D", "option_text")
    assert read_choice("It looked white at first, but it is blue.", 4, options) == ("C", "option_text")


@pytest.mark.parametrize(
    "text, said",
    [
        ("Based on the image, yes, it is.", "yes"),
        ("No.", "no"),
        ("yes or no", "unknown"),
        ("It is a cat.", "unknown"),
        ("Nobody said yesterday", "unknown"),
    ],
)
def test_yes_no(text, said):
    assert yes_no(text) == said


@pytest.mark.parametrize(
    "text, value",
    [
        ("2\\sqrt{3}", 2 * math.sqrt(3)),
        ("\\frac{\\sqrt{2}}{2}", math.sqrt(2) / 2),
        ("\\sqrt[3]{8}", 2.0),
        ("3 \\times 10^{-2}", 0.03),
        ("6.02e23", 6.02e23),
        ("4\\pi", 4 * math.pi),
        ("12 cm^2", 12.0),
        ("9.8 m/s^2", 9.8),
        ("6\\,\\text{cm}^2", 6.0),
        ("5\\,\\mathrm{m/s^{2}}", 5.0),
        ("x = -\\frac{3}{4}", -0.75),
        ("1,200", 1200.0),
        ("45^\\circ", 45.0),
        ("x+1", None),
        ("2x", None),
        ("3 and 4", None),
        ("\\frac{1}{0}", None),
        ("\\sqrt{-4}", None),
        ("9^{9^{9^{9}}}", None),  # refused, not computed for minutes
        ("", None),
    ],
)
def test_evaluate(text, value):
    got = evaluate(text)
    assert got is None if value is None else got == pytest.approx(value)


def test_parse_number_is_literal_only():
    assert parse_number("\\frac{1}{2}") == 0.5 and parse_number("3/4") == 0.75
    assert parse_number("\\sqrt{2}") is None and parse_number("2^3") is None and parse_number("4\\pi") is None


def test_leading_value():
    assert leading_value("12 because 3 x 4 = 12") == 12
    assert leading_value("5, since 2 + 3 = 5 and not 6") == 5
    assert leading_value("12 cm^2 in total") == 12
    assert leading_value("2x + 1") is None and leading_value("x + 1") is None


def test_strip_units():
    assert strip_units("12\\,\\text{cm}^{2}") == "12"
    assert strip_units("$30") == "30"
    assert strip_units("2\\pi") == "2\\pi"  # a constant, not a unit


@pytest.mark.parametrize("seed", range(5))
def test_random_text_always_gets_a_scored_verdict(seed):
    """Whatever a model writes (tags and boxes left open, stray braces, huge powers), every scorer that needs
    no math-verify answers correct or incorrect, never raises."""
    import random

    from avar_ops.grading import score

    rng = random.Random(seed)
    pieces = list("abcdeABCDE0123456789.,;:()[]{}\\^_=+-*/$\n ") + [
        "\\boxed{",
        "\\frac",
        "\\sqrt",
        "answer is ",
        "Therefore, ",
        "**",
        "<answer>",
        "</answer>",
        "<think>",
        "</think>",
        " cm^2",
        " yes",
        " no",
        "\\text{",
        "9^{9^{9^{9}}}",
    ]
    fields = [
        ("mathvista", {"answer": "3", "question_type": "free_form", "answer_type": "integer"}),
        ("mathvista", {"answer": "45°", "question_type": "multi_choice", "choices": ["30°", "45°"]}),
        ("mmmu", {"answer": "A", "options": ["x", "y", "z"], "id": "q"}),
        ("mmmu", {"answer": "24", "question_type": "open", "options": []}),
        ("mmstar", {"answer": "B", "question": "Options: A: x, B: y"}),
        ("hallusionbench", {"gt_answer": "1", "category": "VS", "figure_id": "0"}),
    ]
    for _ in range(20):
        text = "".join(rng.choice(pieces) for _ in range(rng.choice([5, 50, 500])))
        for name, f in fields:
            for mode in ("official", "strict"):
                assert score(name, text, f, mode).scored
