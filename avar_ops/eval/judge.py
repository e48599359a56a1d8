"""Optional answer extraction by a judge model behind an OpenAI-compatible endpoint, as the harnesses that use
GPT-based extraction do. The judge only reads the final answer out of a response; checking it against the
reference stays rule-based (`avar_ops.grading.answers`), so the two modes differ in extraction alone."""

from __future__ import annotations

from typing import List, Sequence

from avar_ops.grading import ChatClient, ChatClientError

_INSTRUCTION = (
    "You read a model's response to a question and copy out its final answer, nothing else. For a "
    "multiple-choice question give the option letter only; for a number give the number (no units); for a "
    "formula give it in LaTeX; for yes/no give yes or no. If the response gives no answer, reply NONE."
)


class Judge:
    """Wraps each judge output in <answer>…</answer> so that the answer checker reads it first."""

    def __init__(self, client: ChatClient):
        self.client = client

    @property
    def mode(self) -> str:
        return "judge:%s@%s" % (self.client.model, self.client.url)

    def extract(self, questions: Sequence[str], responses: Sequence[str]) -> List[str]:
        conversations = [
            [
                {"role": "system", "content": _INSTRUCTION},
                {"role": "user", "content": "Question:\n%s\n\nResponse:\n%s\n\nFinal answer:" % (q, r)},
            ]
            for q, r in zip(questions, responses)
        ]
        outputs = self.client.complete_many(conversations, temperature=0.0)
        return [
            "<answer></answer>" if o.strip().upper() == "NONE" else "<answer>%s</answer>" % o.strip() for o in outputs
        ]


__all__ = ["Judge", "ChatClientError"]
