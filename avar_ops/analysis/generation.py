"""Greedy answers to samples under an intervention, a batch at a time, with optional progress bars."""

from __future__ import annotations

from typing import List, Optional

from avar_ops.data import build_inputs, normalize_sample
from avar_ops.method import Intervention, generate

__all__ = ["generate_answers"]


class _TokenProgress:
    """A `generate` streamer that only counts: one tqdm bar over the decoding steps of a batch."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="token", leave=False)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.bar.update(1)

    def end(self) -> None:
        self.bar.close()


def generate_answers(
    model,
    processor,
    samples,
    *,
    intervention: Optional[Intervention] = None,
    max_new_tokens: int = 32,
    batch_size: int = 1,
    progress: bool = False,
) -> List[dict]:
    """Greedy answers to `samples` (dicts / JSONL records) under the intervention, `batch_size` at a time.

    Returns one {"id", "answer", "tokens"} per sample; tokens are the generated ids up to and including the
    end-of-turn token. progress=True shows a bar over the samples and one over each batch's decoding steps.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"generate: batch_size must be a positive int, got {batch_size!r}")
    samples = [normalize_sample(s, i) for i, s in enumerate(samples)]
    device = next(model.parameters()).device
    results = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(samples), desc="answers", unit="sample")
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        inputs = build_inputs(processor, batch, device=device)
        streamer = _TokenProgress(max_new_tokens, f"tokens of {batch[0]['id']}") if progress else None
        rows = generate(
            model, processor, inputs, intervention=intervention, max_new_tokens=max_new_tokens, streamer=streamer
        )
        for s, tokens in zip(batch, rows):
            results.append(
                {
                    "id": s["id"],
                    "answer": processor.tokenizer.decode(tokens, skip_special_tokens=True),
                    "tokens": tokens,
                }
            )
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return results
