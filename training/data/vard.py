"""VARD synthesis: visual-anchored reflective reasoning data from question records, in three generator calls.

Per record (an image question from `avar_ops.data.records`):
1. describe: a structured description of the image (global scan → elements → relations → synthesis);
2. reason: step-by-step reasoning with self-reflection, conditioned on the description and the question;
3. anchor: the reasoning rewritten with explicit visual anchors ("looking back at the image, …") into
   `<think>…</think><answer>…</answer>`, the SFT target.
Each stage's prompt is a template file (`describe.txt`, `reason.txt`, `anchor.txt`, shipped in
`training/data/templates/`; `templates_dir` points at the user's own), with `{question}`, `{description}` and
`{reasoning}` filled in.

Generators are callables `(messages, images) -> str`: messages are chat turns whose content is a list of
`{"type": "image"}` / `{"type": "text", "text": ...}` parts, images the PIL images in the order of the image
parts. Shipped: `HTTPGenerator` (an OpenAI-compatible chat-completions endpoint such as vLLM or SGLang, through
`avar_ops.grading.ChatClient`: concurrency limit, timeout, retries with backoff), `HFGenerator`
(a local Hugging Face Qwen2.5-VL) and any "module:function".

Outputs in `output_dir` (nothing is written elsewhere):
- `vard.jsonl`: kept records, SFT format (`response` is the anchored target; the image is copied into
  `images/` under a content hash, so the file is a self-contained data folder for `avar-train sft`);
- `rejects.jsonl`: each rejected record with its stage and reason (marker, format, anchors, answer, duplicate,
  checker timeout/error, generator error);
- `summary.json`: kept / rejected counts by reason.
Both JSONL files are append-only and flushed per record: a restart (`resume=true`) skips every id already kept
or rejected (generator errors excepted: those are retried), and a crash or Ctrl-C loses at most the records in
flight (a torn last line is cut off on restart). Ctrl-C cancels the requests in flight (the HTTP generator shuts
their connections down) and starts no further stage, so the command stops within moments. One run writes a
folder at a time (the run-folder lock of `avar-train`).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import importlib
import io
import json
import logging
import os
import re
import shutil
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Dict, List, Optional, Sequence

from avar_ops.data import Record, TextError, check_text, load_records
from avar_ops.hf import render_chat

__all__ = [
    "VARDError",
    "Templates",
    "load_templates",
    "HTTPGenerator",
    "HFGenerator",
    "validate_output",
    "Summary",
    "run_vard",
    "TEMPLATE_DIR",
    "GENERATOR_ERROR",
]

logger = logging.getLogger(__name__)

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
_STAGES = ("describe", "reason", "anchor")
_REQUIRED = {"describe": (), "reason": ("{description}", "{question}"), "anchor": ("{reasoning}",)}
GENERATOR_ERROR = "generator_error"
_TARGET = re.compile(r"^\s*<think>(?P<think>.+?)</think>\s*<answer>(?P<answer>.+?)</answer>\s*$", re.DOTALL)

Generator = Callable[[List[dict], list], str]


class VARDError(RuntimeError):
    """A VARD run that cannot go on (bad templates, generator set-up, unusable output folder)."""


# ------------------------------------------------------------------------------------------------- templates


@dataclasses.dataclass(frozen=True)
class Templates:
    describe: str
    reason: str
    anchor: str

    def fill(self, stage: str, **values: str) -> str:
        text = getattr(self, stage)
        for key, value in values.items():  # literal replacement: templates may hold LaTeX braces
            text = text.replace("{" + key + "}", value)
        return text


def load_templates(folder: Optional[str] = None) -> Templates:
    folder = folder or TEMPLATE_DIR
    texts = {}
    for stage in _STAGES:
        path = os.path.join(folder, f"{stage}.txt")
        if not os.path.isfile(path):
            raise VARDError(
                f"templates: {path} not found (a templates folder holds describe.txt, reason.txt, anchor.txt)"
            )
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:  # a prompt the HF generator tokenises as typed
            check_text(text, where=f"templates: {path}", field=stage)
        except TextError as exc:
            raise VARDError(str(exc)) from None
        missing = [p for p in _REQUIRED[stage] if p not in text]
        if missing or not text.strip():
            raise VARDError(f"templates: {path} must contain {list(_REQUIRED[stage])}; missing {missing}")
        texts[stage] = text
    return Templates(**texts)


# ------------------------------------------------------------------------------------------------ generators


def _grading_name(name: str, needed_by: str):
    """A public name of avar_ops.grading (the shared chat client and answer checker), or a clear error."""
    import avar_ops.grading as grading

    value = getattr(grading, name, None)
    if value is None:
        raise VARDError(f"{needed_by} needs avar_ops.grading.{name}, which this installation does not have")
    return value


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class HTTPGenerator:
    """An OpenAI-compatible chat-completions endpoint; images travel inline as PNG data URLs.

    `client` is anything with `.complete(messages) -> str`; `from_config` builds the project's `ChatClient`.
    """

    def __init__(self, client):
        self.client = client

    @classmethod
    def from_config(cls, cfg) -> "HTTPGenerator":
        ChatClient = _grading_name("ChatClient", "generator 'http'")
        api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not api_key:
            raise VARDError(f"api_key_env: the environment variable {cfg.api_key_env} is not set")
        client = ChatClient(
            cfg.base_url,
            cfg.model,
            api_key=api_key,
            timeout=cfg.timeout,
            max_retries=cfg.max_retries,
            concurrency=cfg.concurrency,
            backoff=cfg.retry_backoff,
            temperature=cfg.temperature,
            max_tokens=cfg.max_new_tokens,
        )
        return cls(client)

    def __call__(self, messages: List[dict], images: list) -> str:
        queue = list(images)
        wire = []
        for message in messages:
            parts = []
            for part in message["content"]:
                if part["type"] == "image":
                    parts.append({"type": "image_url", "image_url": {"url": _data_url(queue.pop(0))}})
                else:
                    parts.append({"type": "text", "text": part["text"]})
            wire.append({"role": message["role"], "content": parts})
        return self.client.complete(wire)

    def cancel(self) -> None:
        """End the requests in flight (on Ctrl-C)."""
        cancel = getattr(self.client, "cancel", None)
        if callable(cancel):
            cancel()


class HFGenerator:
    """A local Qwen2.5-VL (`transformers`), sampling with the given temperature; one request at a time."""

    def __init__(self, model, processor, max_new_tokens: int = 2048, temperature: float = 0.7):
        self.model, self.processor = model, processor
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg) -> "HFGenerator":
        from ..sft.trainer import load_model_and_processor

        if not str(cfg.model).startswith("tiny") and not os.path.isdir(cfg.model):
            raise VARDError(
                f"model: generator 'hf' needs 'tiny', 'tiny:FAMILY' or a local checkpoint folder, got {cfg.model!r}"
            )
        model, processor = load_model_and_processor(cfg.model, bf16=False, seed=0)
        return cls(model.eval(), processor, cfg.max_new_tokens, cfg.temperature)

    def __call__(self, messages: List[dict], images: list) -> str:
        import torch

        text = render_chat(self.processor, messages, add_generation_prompt=True)
        kwargs = {"images": [images]} if images else {}
        inputs = self.processor(text=[text], return_tensors="pt", **kwargs)
        sample = self.temperature > 0
        with self._lock, torch.no_grad():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=sample,
                temperature=self.temperature if sample else None,
            )
        new = out[0, inputs["input_ids"].shape[1] :]  # [new tokens]
        return self.processor.tokenizer.decode(new, skip_special_tokens=True)


def _load_callable(spec: str) -> Generator:
    module_name, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise VARDError(f"generator {spec!r}: cannot import it ({exc})") from None
    if not callable(fn):
        raise VARDError(f"generator {spec!r} is not callable")
    return fn


def build_generator(cfg) -> Generator:
    if cfg.generator == "http":
        return HTTPGenerator.from_config(cfg)
    if cfg.generator == "hf":
        return HFGenerator.from_config(cfg)
    return _load_callable(cfg.generator)


# ------------------------------------------------------------------------------------------------ validation


def _default_checker():
    return _grading_name("check_answer", "answer_check (set answer_check: false to keep outputs unchecked)")


def validate_output(
    text: str,
    reference: Optional[str],
    *,
    anchor_phrases: Sequence[str],
    min_anchors: int,
    checker=None,
    where: str = "generated text",
) -> Optional[str]:
    """None when `text` is a usable target, else the reason (one of marker / format / anchors / answer /
    checker_*). A chat-template marker or over-long text (`avar_ops.data.check_text`) is refused first: the
    target is trained on as typed, so a `<|im_end|>` in it would end the turn early; `where` names the record.

    checker: `check_answer(response, gold)` -> a result whose `.status` is correct / incorrect / timeout / error
    (the shared answer checker, whose LaTeX comparisons run under a hard deadline), or None to skip the check.
    """
    try:
        check_text(text, where=where, field="response")
    except TextError as exc:
        return f"marker: {exc}"
    match = _TARGET.match(text or "")
    if match is None:
        return "format: not <think>…</think><answer>…</answer>"
    if not match.group("answer").strip():
        return "format: empty <answer>"
    think = match.group("think").lower()
    anchors = sum(think.count(p.lower()) for p in anchor_phrases)
    if anchors < min_anchors:
        return f"anchors: {anchors} visual anchor(s) in <think>, need {min_anchors}"
    if checker is not None and reference is not None:
        result = checker(text, reference)
        if result.status == "incorrect":
            return f"answer: {getattr(result, 'extracted', None)!r} does not match the reference {reference!r}"
        if result.status in ("timeout", "error"):
            return f"checker_{result.status}: the answer could not be checked ({getattr(result, 'detail', '')})"
    return None


# ------------------------------------------------------------------------------------------------------- run


@dataclasses.dataclass
class Summary:
    total: int = 0  # input records
    skipped: int = 0  # already finished in an earlier run
    kept: int = 0
    rejected: Dict[str, int] = dataclasses.field(default_factory=dict)  # by reason kind
    bad_input: int = 0  # input records rejected by the loader

    def line(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        return (
            f"vard: {self.kept} kept, {sum(self.rejected.values())} rejected ({reasons}), {self.skipped} "
            f"already done, {self.bad_input} bad input records, of {self.total}"
        )


def _read_finished(path: str, key: Callable[[dict], bool]) -> List[dict]:
    """Rows of an append-only JSONL file, cutting off a torn last line (an interrupted write)."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning(
            "%s: cutting off an unfinished last line (%d bytes) from an interrupted run", path, len(data) - end
        )
        with open(path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    rows = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise VARDError(f"{path}:{lineno}: not valid JSON; the output folder is not a VARD output") from None
            if key(row):
                rows.append(row)
    return rows


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def _copy_image(path: str, images_dir: str) -> str:
    """The image copied into images_dir under its content hash; returns the path relative to the output."""
    with open(path, "rb") as f:
        data = f.read()
    ext = os.path.splitext(path)[1].lower()
    ext = ext if re.fullmatch(r"\.[a-z0-9]{1,5}", ext) else ".img"
    name = hashlib.sha256(data).hexdigest()[:24] + ext
    target = os.path.join(images_dir, name)
    if not os.path.exists(target):
        tmp = f"{target}.{os.getpid()}.{threading.get_ident()}.part"  # never shared by two writers
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
    return "images/" + name


class _Cancelled(Exception):
    """The run was interrupted before this record's next stage."""


def _synthesise(
    record: Record, generator: Generator, templates: Templates, stop: Optional[threading.Event] = None
) -> dict:
    """The three stages for one record: {"description", "reasoning", "response"}; `stop` set ends it before
    its next stage."""
    from PIL import Image

    images = []
    for path in record.images:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    question = record.question
    system = [m for m in record.prompt_messages if m["role"] == "system"]
    image_parts = [{"type": "image"} for _ in images]

    def ask(stage: str, with_images: bool, **values) -> str:
        if stop is not None and stop.is_set():
            raise _Cancelled(stage)
        text = templates.fill(stage, question=question, **values)
        parts = (image_parts if with_images else []) + [{"type": "text", "text": text}]
        reply = generator(system + [{"role": "user", "content": parts}], images if with_images else [])
        if not isinstance(reply, str):
            raise TypeError(f"the generator returned {type(reply).__name__}, not str")
        return reply

    description = ask("describe", True)
    reasoning = ask("reason", True, description=description)
    response = ask("anchor", True, description=description, reasoning=reasoning)
    return {"description": description, "reasoning": reasoning, "response": response}


def run_vard(cfg, generator: Optional[Generator] = None) -> Summary:
    """Synthesise VARD data as `cfg` (an `avar_train.data.vard_config.VARDConfig`) says; `generator` overrides cfg's."""
    from tqdm.auto import tqdm

    templates = load_templates(cfg.templates_dir)
    checker = _default_checker() if cfg.answer_check else None
    os.makedirs(cfg.output_dir, exist_ok=True)
    out_path = os.path.join(cfg.output_dir, "vard.jsonl")
    rejects_path = os.path.join(cfg.output_dir, "rejects.jsonl")
    images_dir = os.path.join(cfg.output_dir, "images")
    os.makedirs(images_dir, exist_ok=True)

    loaded = load_records(
        cfg.input_file,
        use="any",
        on_error="skip" if cfg.skip_bad_records else "raise",
        rejects_path=os.path.join(cfg.output_dir, "input_rejects.jsonl"),
        limit=cfg.limit,
        format=cfg.data_format,
    )
    kept_rows = _read_finished(out_path, lambda row: True)
    all_rejects = _read_finished(rejects_path, lambda row: True)
    final_rejects = [row for row in all_rejects if not row.get("reason", "").startswith(GENERATOR_ERROR)]
    written_rejects = {json.dumps(row, ensure_ascii=False, sort_keys=True) for row in all_rejects}
    done = {str(r["id"]) for r in kept_rows} | {str(r["id"]) for r in final_rejects}
    seen_responses = {_normalise(r["response"]) for r in kept_rows}
    todo = [r for r in loaded.records if r.id not in done]
    summary = Summary(
        total=len(loaded.records) + loaded.rejected, skipped=len(loaded.records) - len(todo), bad_input=loaded.rejected
    )
    if generator is None:
        generator = build_generator(cfg)
    if not callable(generator):
        raise VARDError(f"generator must be callable, got {type(generator).__name__}")

    def reject(f_rejects, record: Record, stage: str, reason: str, outputs: Optional[dict]) -> None:
        kind = reason.split(":", 1)[0]
        summary.rejected[kind] = summary.rejected.get(kind, 0) + 1
        row = {"id": record.id, "stage": stage, "reason": reason, **(outputs or {})}
        key = json.dumps(row, ensure_ascii=False, sort_keys=True)
        if key in written_rejects:  # a retried request that failed the same way again: one row is enough
            return
        written_rejects.add(key)
        f_rejects.write(json.dumps(row, ensure_ascii=False) + "\n")
        f_rejects.flush()

    pool = ThreadPoolExecutor(max_workers=cfg.concurrency)
    stop = threading.Event()
    interrupted = False
    with (
        open(out_path, "a", encoding="utf-8") as f_out,
        open(rejects_path, "a", encoding="utf-8") as f_rejects,
        tqdm(total=len(todo), desc="vard", unit="record") as bar,
    ):
        pending = {}
        queue = collections.deque(todo)
        try:
            while queue or pending:
                while queue and len(pending) < cfg.concurrency:  # bounded: Ctrl-C loses only these
                    record = queue.popleft()
                    pending[pool.submit(_synthesise, record, generator, templates, stop)] = record
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in finished:
                    record = pending.pop(future)
                    bar.update(1)
                    try:
                        outputs = future.result()
                    except Exception as exc:  # a failed request after its retries: the record is retried next run
                        reject(f_rejects, record, "generate", f"{GENERATOR_ERROR}: {type(exc).__name__}: {exc}", None)
                        continue
                    reason = validate_output(
                        outputs["response"],
                        record.answer,
                        anchor_phrases=cfg.anchor_phrases,
                        min_anchors=cfg.min_anchors,
                        checker=checker,
                        where=f"record {record.id!r}",
                    )
                    key = _normalise(outputs["response"])
                    if reason is None and key in seen_responses:
                        reason = "duplicate: the same response was already kept"
                    if reason is not None:
                        reject(f_rejects, record, "validate", reason, outputs)
                        continue
                    seen_responses.add(key)
                    f_out.write(
                        json.dumps(_output_record(record, outputs, images_dir, cfg.input_file), ensure_ascii=False)
                        + "\n"
                    )
                    f_out.flush()
                    summary.kept += 1
        except KeyboardInterrupt:
            interrupted = True
            # Cancel the requests in flight (an HTTP generator shuts their connections down) and start no
            # further stage: the records in flight are the only ones lost, and the next run asks them again.
            stop.set()
            cancel = getattr(generator, "cancel", None)
            if callable(cancel):
                cancel()
            raise
        finally:
            pool.shutdown(wait=not interrupted, cancel_futures=True)
    with open(os.path.join(cfg.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(summary), f, indent=1)
    logger.info(summary.line())
    return summary


def _output_record(record: Record, outputs: dict, images_dir: str, source: str) -> dict:
    row = {"id": record.id}
    images = [_copy_image(p, images_dir) for p in record.images]
    if images:
        row["images"] = images
    system = [m for m in record.messages if m["role"] == "system"]
    if system:
        row["system"] = "".join(p["text"] for p in system[0]["content"] if p["type"] == "text")
    row["question"] = record.question
    if record.answer is not None:
        row["answer"] = record.answer
    row["response"] = outputs["response"]
    row["meta"] = {
        "source": os.path.basename(source),
        "description": outputs["description"],
        "reasoning": outputs["reasoning"],
    }
    return row
