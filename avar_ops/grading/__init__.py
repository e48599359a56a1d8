"""Grading model answers: candidate extraction with the rule that produced each, one scorer per benchmark
implementing its official rule (`score`), answer checking (letters, numbers, LaTeX through math-verify in a
worker pool with a hard timeout), shared by `avar eval`, VARD and the GRPO reward; and an OpenAI-compatible
chat client (the judge, VARD's HTTP generator). LaTeX checking needs the `eval` extra."""

from avar_ops.grading.answers import (
    MAX_OPTIONS,
    AnswerChecker,
    AnswerSpec,
    CheckResult,
    Extraction,
    check_answer,
    check_answers,
    extract_answer,
)
from avar_ops.grading.chat_client import ChatClient, ChatClientError
from avar_ops.grading.extraction import Candidate, candidates, read_choice, yes_no
from avar_ops.grading.latex_checker import LatexChecker
from avar_ops.grading.scorers import MODES, SCORERS, ScoreResult, score
from avar_ops.grading.values import evaluate

__all__ = [
    "MAX_OPTIONS",
    "AnswerChecker",
    "AnswerSpec",
    "CheckResult",
    "Extraction",
    "check_answer",
    "check_answers",
    "extract_answer",
    "ChatClient",
    "ChatClientError",
    "LatexChecker",
    "Candidate",
    "candidates",
    "read_choice",
    "yes_no",
    "evaluate",
    "MODES",
    "SCORERS",
    "ScoreResult",
    "score",
]
