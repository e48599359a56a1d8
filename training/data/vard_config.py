"""`VARDConfig`: the recipe of `avar-train vard` (VARD data synthesis)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from ..config import Problems, data_format, existing_file, non_negative, positive, positive_float, require

__all__ = ["VARDConfig"]


@dataclass
class VARDConfig:
    input_file: str = ""  # JSONL records with question (+ answer) and image(s)
    data_format: str = "auto"  # layout of input_file: avar | sharegpt | openai | auto
    output_dir: str = ""  # gets vard.jsonl (kept), rejects.jsonl, summary.json
    templates_dir: Optional[str] = None  # folder with describe.txt, reason.txt, anchor.txt (default: shipped)
    generator: str = "http"  # http | hf | "module:function" (a callable (messages, images) -> str)
    base_url: Optional[str] = None  # http: the OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1
    model: Optional[str] = None  # http: the served model name; hf: a local checkpoint folder or "tiny"
    api_key_env: Optional[str] = None  # http: name of the environment variable holding the API key
    timeout: float = 120.0
    max_retries: int = 3
    retry_backoff: float = 1.0  # seconds before the first retry, doubling after each
    concurrency: int = 8
    temperature: float = 0.7
    max_new_tokens: int = 2048
    min_anchors: int = 1
    anchor_phrases: List[str] = field(
        default_factory=lambda: [
            "look back at",
            "looking back at",
            "look at the image",
            "looking at the image",
            "in the image",
            "the image shows",
            "check the image",
            "from the image",
            "in the figure",
            "the figure shows",
        ]
    )
    answer_check: bool = True  # keep an output only if its answer agrees with the record's reference
    skip_bad_records: bool = False
    limit: Optional[int] = None
    resume: bool = False  # continue the run in output_dir: records already kept or rejected are not asked again
    overwrite: bool = False  # remove the run in output_dir and start again

    def validate(self) -> "VARDConfig":
        p = Problems()
        require(p, self.input_file, "input_file", "the JSONL file of question records")
        require(p, self.output_dir, "output_dir", "the folder the synthesised data goes to")
        existing_file(p, self.input_file, "input_file")
        data_format(p, self.data_format)
        if self.templates_dir is not None and not os.path.isdir(self.templates_dir):
            p.add("templates_dir", f"no such folder {self.templates_dir!r}")
        if self.generator == "http":
            if not self.base_url or not self.base_url.startswith(("http://", "https://")):
                p.add("base_url", f"must be an http(s) URL for generator 'http', got {self.base_url!r}")
            if not self.model:
                p.add("model", "required for generator 'http' (the served model's name)")
        elif self.generator == "hf":
            if not self.model:
                p.add("model", "required for generator 'hf' (a local checkpoint folder or 'tiny')")
        elif ":" not in self.generator:
            p.add("generator", f"must be 'http', 'hf' or 'module:function', got {self.generator!r}")
        for name in ("max_retries", "min_anchors"):
            if getattr(self, name) < 0:
                p.add(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("concurrency", "max_new_tokens"):
            positive(p, self, name)
        positive_float(p, self, "timeout")
        non_negative(p, self, "retry_backoff")
        non_negative(p, self, "temperature")
        if self.limit is not None and self.limit <= 0:
            p.add("limit", f"must be a positive int or null, got {self.limit}")
        if self.resume and self.overwrite:
            p.add("overwrite", "resume and overwrite exclude each other; choose one")
        if self.min_anchors and not self.anchor_phrases:
            p.add("anchor_phrases", "must not be empty when min_anchors > 0")
        p.raise_any()
        return self
