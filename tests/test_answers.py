"""Answer extraction and checking on hand-checked cases, and the LaTeX pool's timeouts and dead workers."""

import os
import signal
import threading
import time

import pytest

from avar_ops.grading.answers import (
    AnswerChecker,
    AnswerSpec,
    extract_answer,
    extract_choice,
    infer_kind,
    last_boxed,
    parse_number,
)
from avar_ops.grading.latex_checker import LatexChecker

# sympy works on this tower of powers for minutes; math-verify's SIGALRM timeout is off in the workers
HANGING = "$9^{9^{9^{9}}}$"


@pytest.fixture(scope="module")
def latex():
    with LatexChecker(workers=2, timeout=3.0) as checker:
        yield checker


@pytest.fixture()
def checker(latex):
    return AnswerChecker(latex)


@pytest.mark.parametrize(
    "response, text, method",
    [
        ("<think>so 4</think><answer>42</answer>", "42", "answer_tag"),
        ("<answer>first</answer> then <answer>\\boxed{7}</answer>", "7", "answer_tag"),
        ("We get \\boxed{\\frac{1}{2}} and finally \\boxed{3}.", "3", "boxed"),
        ("so \\boxed{x^{2}+\\frac{1}{2}}", "x^{2}+\\frac{1}{2}", "boxed"),
        ("Long reasoning.\nThe answer is 3.50.", "3.50", "answer_is"),
        ("Final answer: (C)", "(C)", "answer_is"),
        ("  B.  ", "B", "full"),
        ("", None, "none"),
    ],
)
def test_extract_answer(response, text, method):
    got = extract_answer(response)
    assert (got.text, got.method) == (text, method)


def test_last_boxed_needs_balanced_braces():
    assert last_boxed("\\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    "text, letter",
    [
        ("(B)", "B"),
        ("B.", "B"),
        ("B", "B"),
        ("b", "B"),
        ("B) 42 degrees", "B"),
        ("C. 12", "C"),
        ("The answer is (D).", "D"),
        ("I think the correct option is E", "E"),
        ("Comparing (A) and (B), we choose (C)", "C"),
        ("A cat sits on the mat", None),  # an article, not an option
        ("(K)", None),  # out of range for 10 options
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text, 10) == letter


def test_extract_choice_by_option_text():
    options = ["red", "green", "blue", "yellow"]
    assert extract_choice("The ball is green.", 4, options) == "B"
    assert extract_choice("It is not red but blue", 4, options) == "C"  # the latest mention wins
    # An option named again after another one: its last mention counts, not its first.
    assert extract_choice("Red? Not blue. Red.", 4, options) == "A"
    assert extract_choice("(E)", 4) is None
    with pytest.raises(ValueError, match="num_options"):
        extract_choice("A", 11)
    with pytest.raises(ValueError, match="options"):
        extract_choice("green", 4, ["red"])


@pytest.mark.parametrize(
    "text, value",
    [
        ("3.50", 3.5),
        ("1,200", 1200.0),
        ("12 cm", 12.0),
        ("12\\text{ cm}", 12.0),
        ("45^\\circ", 45.0),
        ("30%", 30.0),
        ("$5", 5.0),
        ("\\frac{1}{2}", 0.5),
        ("-\\frac{3}{4}", -0.75),
        ("3/4", 0.75),
        ("1e-3", 0.001),
        ("x+1", None),
        ("3 and 4", None),
        ("\\sqrt{2}", None),
    ],
)
def test_parse_number(text, value):
    got = parse_number(text)
    assert got == value if value is None else got == pytest.approx(value)


@pytest.mark.parametrize(
    "gold, kind",
    [
        ("B", "choice"),
        ("(C)", "choice"),
        ("3.5", "number"),
        ("\\frac{1}{2}", "number"),
        ("x^2+1", "latex"),
        ("\\sqrt{3}", "latex"),
        ("Yes", "text"),
    ],
)
def test_infer_kind(gold, kind):
    assert infer_kind(gold) == kind


def test_choice_answers(checker):
    def check(response, gold, **kw):
        return checker.check(response, AnswerSpec(gold, "choice", num_options=kw.pop("n", 4), **kw))

    assert check("(B)", "B").correct
    assert check("B.", "B").correct
    assert check("<answer>B</answer>", "B").correct
    assert check("The answer is B", "B").correct
    result = check("The answer is (C)", "B")
    assert (result.status, result.extracted, result.kind) == ("incorrect", "C", "choice")
    assert check("so \\boxed{J}", "J", n=10).correct  # MMMU-Pro has ten options
    assert check("The answer is B because (C) is wrong", "B").correct
    assert check("The answer is: (D), not (A)", "D").correct
    assert check("It must be green", "B", options=["red", "green", "blue", "pink"]).correct
    assert check("I cannot tell", "A").status == "incorrect"
    bad = check("A", "Z")
    assert bad.status == "error" and "not an option letter" in bad.detail


def test_number_answers(checker):
    def check(response, gold, **kw):
        return checker.check(response, AnswerSpec(gold, "number", **kw))

    assert check("The answer is 3.50", "3.5").correct
    assert check("\\boxed{\\frac{1}{2}}", "0.5").correct
    assert check("The length is 12 cm.", "12").correct  # units are not part of the value
    assert check("<answer>12 \\text{cm}</answer>", "12").correct
    assert check("The total is 1,200 dollars, so the answer is $1,200", "1200").correct
    assert check("We find 2.4449 in the end.", "2.44", precision=2).correct  # MathVista rounds to precision
    assert not check("We find 2.456 in the end.", "2.44", precision=2).correct
    assert not check("The answer is 3.6", "3.5").correct
    assert check("3.5000001", "3.5", rel_tol=1e-6).correct
    no_number = check("cannot be determined", "3.5")
    assert no_number.status == "incorrect"
    bad = check("3", "three")
    assert bad.status == "error" and "not a number" in bad.detail


def test_latex_answers(checker):
    def check(response, gold):
        return checker.check(response, AnswerSpec(gold, "latex"))

    assert check("\\boxed{\\frac{1}{2}}", "0.5").correct
    assert check("The answer is $\\frac{1}{2}$", "\\frac{2}{4}").correct
    assert check("\\boxed{\\sqrt{8}}", "2\\sqrt{2}").correct
    assert check("\\boxed{(x+1)^2}", "x^2+2x+1").correct
    assert check("\\boxed{x^2}", "x^3").status == "incorrect"
    # a number reference with a non-numeric prediction goes to math-verify too
    assert checker.check("\\boxed{\\sqrt{4}}", AnswerSpec("2", "number")).correct


def test_alternative_references(checker):
    spec = AnswerSpec("24", "auto", alternatives=("24.0", "twenty-four"))
    assert checker.check("The answer is twenty-four", spec).correct
    assert checker.check("\\boxed{24}", spec).correct
    wrong = checker.check("The answer is 25", spec)
    assert wrong.status == "incorrect" and wrong.extracted == "25"
    before = dict(checker.counts)
    checker.check("The answer is 25", spec)
    assert checker.counts["incorrect"] == before["incorrect"] + 1  # counted once, not once per reference
    # one reference unchecked (timeout) and none matching: not scored as wrong
    hanging = checker.check("\\boxed{%s}" % HANGING.strip("$"), AnswerSpec("3", "latex", alternatives=("4",)))
    assert hanging.status == "timeout"


def test_text_answers(checker):
    assert checker.check("Yes.", AnswerSpec("yes", "text")).correct
    assert checker.check("No, the lines are not parallel.", AnswerSpec("No", "text")).correct
    assert not checker.check("Yes", AnswerSpec("No", "text")).correct
    assert checker.check("The answer is [1,2, 3]", AnswerSpec("[1, 2, 3]", "text")).correct  # MathVista lists


def test_hanging_expression_times_out_and_the_pool_recovers(checker, latex):
    start = time.monotonic()
    results = checker.check_many(
        ["\\boxed{%s}" % HANGING.strip("$"), "\\boxed{\\frac{1}{2}}"],
        [AnswerSpec("3", "latex"), AnswerSpec("0.5", "latex")],
    )
    elapsed = time.monotonic() - start
    assert [r.status for r in results] == ["timeout", "correct"]
    assert not results[0].scored and results[0].detail.startswith("no verdict")
    assert elapsed < 3.0 + 60.0  # the deadline plus a worker restart, never sympy's minutes
    assert checker.counts["timeout"] == 1 and checker.counts["correct"] == 1
    assert latex.check("$x+x$", "$2x$").status == "correct"  # the killed worker was replaced


def test_pool_survives_a_killed_worker(latex):
    assert latex.check("1", "1").status == "correct"
    for pid in latex.worker_pids():
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    assert latex.check("$2$", "$2$").status == "correct"

    # a worker killed in the middle of a pair: that pair is an error, the next ones are checked
    def kill_soon():
        time.sleep(1.0)
        for pid in latex.worker_pids():
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    verdict = latex.check(HANGING, "$3$")
    killer.join()
    assert verdict.status == "error" and "exited" in verdict.detail
    assert latex.check("$\\frac{1}{2}$", "$0.5$").status == "correct"


def test_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        LatexChecker(workers=0)
    with pytest.raises(ValueError, match="timeout"):
        LatexChecker(timeout=0)
    with pytest.raises(ValueError, match="kind"):
        AnswerSpec("1", "fuzzy")
    with pytest.raises(TypeError, match="response"):
        extract_answer(None)
    with pytest.raises(ValueError, match="equal lengths"):
        AnswerChecker(LatexChecker()).check_many(["a"], [])
