"""Analysis and tools: VAS measurement and reports, per-patch image heatmaps, plots, sample files, the tiny
offline Qwen2.5-VL, the demo and the `avar` command line; answer extraction and checking shared by the
evaluation suite and the training rewards, and an OpenAI-compatible chat client. Needs the `analysis` extra
(matplotlib, pillow, tqdm, torchvision); answer checking and benchmark files need the `eval` extra."""

from avar_ops.analysis.answers import (
    AnswerChecker,
    AnswerSpec,
    CheckResult,
    Extraction,
    check_answer,
    check_answers,
    extract_answer,
)
from avar_ops.analysis.chat_client import ChatClient, ChatClientError
from avar_ops.analysis.image_attention import ImageAttention, image_attention, save_overlays
from avar_ops.analysis.latex_checker import LatexChecker
from avar_ops.analysis.samples import (
    build_inputs,
    chat_messages,
    generate_answers,
    load_images,
    load_samples,
    normalize_sample,
)
from avar_ops.analysis.tiny_qwen import build_tiny_processor, build_tiny_qwen2_5_vl, synthetic_images
from avar_ops.analysis.vas import VASReport, compare, measure

__all__ = [
    "AnswerChecker",
    "AnswerSpec",
    "CheckResult",
    "Extraction",
    "check_answer",
    "check_answers",
    "extract_answer",
    "LatexChecker",
    "ChatClient",
    "ChatClientError",
    "ImageAttention",
    "image_attention",
    "save_overlays",
    "build_inputs",
    "chat_messages",
    "generate_answers",
    "load_images",
    "load_samples",
    "normalize_sample",
    "build_tiny_processor",
    "build_tiny_qwen2_5_vl",
    "synthetic_images",
    "VASReport",
    "compare",
    "measure",
]
