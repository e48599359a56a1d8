"""Judge mode: a model behind an OpenAI-compatible endpoint does the part of scoring that each benchmark's
official evaluation gives to GPT, and nothing else:

- MathVista: the judge extracts the final answer; MathVista's scorer (`avar_ops.grading.score`) then compares it
  with the reference (the official pipeline: `extract_answer` with GPT, then rule-based normalisation and
  comparison).
- MathVerse: the judge extracts the answer, then judges it against the standard answer, 1 or 0 (the official
  two steps: answer extraction, then the scoring prompt).
- HallusionBench: the judge reads question, reference and response and says correct, incorrect or unclear
  (lmms-eval tasks/hallusion_bench/utils.py, `evaluate_by_chatgpt`; parsed as there: "incorrect" first); an
  unclear reply goes to HallusionBench's scorer as an answer without a yes / no, whose rule decides it.

The other benchmarks' official scoring uses no model, so they stay rule-based under --judge. The prompts are
written from the official repositories' descriptions of these steps. Every judge reply is cached per sample in
RUN/judge/<benchmark>.jsonl under a hash of the judge model and the exact prompt, so a rerun (after an
interruption, or a judge server that went down) asks only what was not answered yet.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from avar_ops.grading import ChatClient, ChatClientError, LatexChecker, ScoreResult, score

JUDGED = ("mathvista", "mathverse", "hallusionbench")

_INSTRUCTION = (
    "You read a model's response to a question and copy out its final answer, nothing else. For a "
    "multiple-choice question give the option letter only; for a number give the number (no units); for a "
    "formula give it in LaTeX; for yes/no give yes or no. If the response gives no answer, reply NONE."
)

_MATHVISTA_EXTRACT = (
    "Below are a math question about a figure (with its hint on the expected answer format) and a model's "
    "response. Extract the model's final answer in the format the hint asks for: the option letter's text or "
    "the letter for a multiple-choice question, an integer, a number with the requested decimal places, or a "
    "list. Reply with the extracted answer only; reply NONE if the response gives no answer.\n\n"
    "{question}\n\nModel response:\n{response}\n\nExtracted answer:"
)

_MATHVERSE_EXTRACT = (
    "A model answered a math problem; its output is the Model Response below. Extract the final answer from "
    "it: an option letter for a multiple-choice problem, otherwise the value or expression it concludes with. "
    "Reply with the extracted answer only, no explanation; reply NONE if there is no answer.\n\n"
    "Model Response:\n{response}\n\nExtracted Answer:"
)

_MATHVERSE_SCORE = (
    "Two answers to one math question follow: the standard answer and the answer extracted from a model's "
    "output. Decide whether they agree. An option letter agrees with the option it names; values agree when "
    "they are mathematically equal, whatever their form (fractions, decimals, radicals, units written or "
    "not). Reply 1 if they agree and 0 if they do not, nothing else.\n\n"
    "Question: {question}\nStandard answer: {gold}\nModel's answer: {extracted}\n\nJudgement:"
)

_HALLUSION_SCORE = (
    "You are a careful teacher. Read the question, the reference answer and the prediction. If the "
    "prediction does not conflict with the reference answer, reply correct. If it conflicts with the "
    "reference answer, reply incorrect. If the prediction does not make its answer clear, reply unclear. "
    "Reply with that one word.\n\nQuestion: {question}\nReference answer: {gold}\nPrediction: {response}\n\n"
    "Judgement:"
)


class JudgeError(RuntimeError):
    """The judge could not be asked (server down, bad answer); answers obtained so far are cached."""


class Judge:
    """Asks the judge model, caches each reply per sample, and turns replies into ScoreResults."""

    def __init__(self, client: ChatClient, cache_dir: Optional[str] = None):
        self.client = client
        self.cache_dir = cache_dir
        self._cache: Dict[str, Dict[str, str]] = {}

    @property
    def mode(self) -> str:
        """The judge's model names the mode; its address may change between a run and its continuation."""
        return "judge:%s" % self.client.model

    @staticmethod
    def covers(benchmark: str) -> bool:
        return benchmark in JUDGED

    def extract(self, questions: Sequence[str], responses: Sequence[str]) -> List[str]:
        """Generic extraction, each output wrapped in <answer>…</answer> so that the answer checker reads it."""
        conversations = [
            [
                {"role": "system", "content": _INSTRUCTION},
                {"role": "user", "content": "Question:\n%s\n\nResponse:\n%s\n\nFinal answer:" % (q, r)},
            ]
            for q, r in zip(questions, responses)
        ]
        outputs = self.client.complete_many(conversations, temperature=0.0)
        return [_tagged(o) for o in outputs]

    def ping(self) -> None:
        """One short request, so that a judge that cannot be reached is found before the model is loaded."""
        try:
            self.client.complete([{"role": "user", "content": "Reply OK."}], max_tokens=2)
        except ChatClientError as exc:
            raise JudgeError("judge at %s: %s" % (self.client.url, exc)) from None

    def check(
        self,
        benchmark: str,
        samples: Sequence,
        responses: Sequence[str],
        mode: str = "official",
        latex: Optional[LatexChecker] = None,
    ) -> Tuple[List[ScoreResult], List[dict]]:
        """ScoreResults for one batch of `benchmark` (one of JUDGED) and, per sample, the judge's replies; `mode`
        is the scorer's (official or strict) where a scorer compares what the judge read."""
        if benchmark == "mathvista":
            prompts = [_MATHVISTA_EXTRACT.format(question=s.prompt, response=r) for s, r in zip(samples, responses)]
            extracted = self._ask(benchmark, "extract", prompts)
            checks = [_relabel(score(benchmark, _tagged(e), s.fields, mode, latex)) for s, e in zip(samples, extracted)]
            return checks, [{"extract": e} for e in extracted]
        if benchmark == "mathverse":
            prompts = [_MATHVERSE_EXTRACT.format(response=r) for r in responses]
            extracted = self._ask(benchmark, "extract", prompts)
            prompts = [
                _MATHVERSE_SCORE.format(
                    question=s.fields.get("question_for_eval") or s.prompt, gold=s.answer.gold, extracted=e
                )
                for s, e in zip(samples, extracted)
            ]
            scores = self._ask(benchmark, "score", prompts)
            checks = []
            for e, reply in zip(extracted, scores):
                verdict = _first_digit(reply)
                if verdict is None:
                    detail = "judge reply %r is not 0 or 1" % reply[:80]
                    checks.append(ScoreResult(False, e, "judge", mode, False, "error", detail))
                else:
                    checks.append(ScoreResult(bool(verdict), e, "judge", mode, False, _status(bool(verdict))))
            return checks, [{"extract": e, "score": s} for e, s in zip(extracted, scores)]
        if benchmark == "hallusionbench":
            golds = [s.fields.get("gt_answer_details") or s.answer.gold for s in samples]
            prompts = [
                _HALLUSION_SCORE.format(question=s.prompt, gold=g, response=r)
                for s, g, r in zip(samples, golds, responses)
            ]
            replies = self._ask(benchmark, "score", prompts)
            checks = []
            for s, reply in zip(samples, replies):
                text = reply.lower()
                # the official parse: "incorrect" is looked for first, since it contains "correct"
                if "incorrect" in text:
                    wrong = "no" if s.answer.gold == "yes" else "yes"
                    checks.append(ScoreResult(False, wrong, "judge", mode, False, _status(False)))
                elif "correct" in text:
                    checks.append(ScoreResult(True, s.answer.gold, "judge", mode, False, _status(True)))
                else:  # unclear: an answer with neither yes nor no, decided by the scorer's rule (figure or not)
                    unclear = score(benchmark, "", s.fields, mode, latex)
                    checks.append(_relabel(unclear, detail="unclear"))
            return checks, [{"score": r} for r in replies]
        raise ValueError("judge: %s is scored without a model (expected one of %s)" % (benchmark, ", ".join(JUDGED)))

    def _ask(self, benchmark: str, step: str, prompts: Sequence[str]) -> List[str]:
        cache = self._load(benchmark)
        keys = [self._key(step, p) for p in prompts]
        todo = [(k, p) for k, p in zip(keys, prompts) if k not in cache]
        if todo:
            try:
                outputs = self.client.complete_many(
                    [[{"role": "user", "content": p}] for _, p in todo], temperature=0.0
                )
            except ChatClientError as exc:
                raise JudgeError("judge at %s: %s" % (self.client.url, exc)) from None
            for (k, _), o in zip(todo, outputs):
                cache[k] = o
                self._append(benchmark, k, o)
        return [cache[k] for k in keys]

    def _key(self, step: str, prompt: str) -> str:
        return hashlib.sha256(("%s\0%s\0%s" % (self.client.model, step, prompt)).encode("utf-8")).hexdigest()

    def _path(self, benchmark: str) -> Optional[str]:
        # benchmark names come from the registry (fixed), never from the data
        return os.path.join(self.cache_dir, benchmark + ".jsonl") if self.cache_dir else None

    def _load(self, benchmark: str) -> Dict[str, str]:
        if benchmark in self._cache:
            return self._cache[benchmark]
        cache: Dict[str, str] = {}
        path = self._path(benchmark)
        if path and os.path.isfile(path) and os.path.getsize(path):
            with open(path, "rb+") as f:  # a last line cut short: end it, so that appending starts a new line
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        cache[entry["key"]] = entry["output"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut short by an interruption: asked again
        self._cache[benchmark] = cache
        return cache

    def _append(self, benchmark: str, key: str, output: str) -> None:
        path = self._path(benchmark)
        if path is None:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "output": output}, ensure_ascii=False) + "\n")


def _tagged(output: str) -> str:
    output = output.strip()
    return "<answer></answer>" if output.upper() == "NONE" else "<answer>%s</answer>" % output


def _relabel(result: ScoreResult, detail: Optional[str] = None) -> ScoreResult:
    """The scorer's verdict on what the judge read, its rule marked as reached through the judge."""
    rule = "judge/" + result.rule
    return ScoreResult(
        result.correct, result.extracted, rule, result.mode, result.flagged, result.status, detail or result.detail
    )


def _status(ok: bool) -> str:
    return "correct" if ok else "incorrect"


def _first_digit(reply: str) -> Optional[int]:
    for ch in reply.strip():
        if ch in "01":
            return int(ch)
        if not ch.isspace() and ch not in "*`'\"[(":
            return None
    return None


__all__ = ["Judge", "JudgeError", "JUDGED", "ChatClientError"]
