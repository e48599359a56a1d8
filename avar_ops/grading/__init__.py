"""Grading model answers: answer extraction and checking (letters, numbers, LaTeX through math-verify in a
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
from avar_ops.grading.latex_checker import LatexChecker

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
]
