"""Analysis: VAS measurement and reports, per-patch image heatmaps, plots, greedy answers under an
intervention, the tiny offline Qwen2.5-VL and the demo. Needs the `analysis` extra (matplotlib, pillow, tqdm,
torchvision).

Moved: answer extraction and checking now live in `avar_ops.grading`; `check_answer`, `check_answers`,
`extract_answer`, `AnswerChecker`, `AnswerSpec`, `CheckResult` and `Extraction` are re-exported here so that
code written against `avar_ops.analysis` keeps working. Samples and image loading moved to `avar_ops.data`,
the `avar` command to `avar_ops.cli`, the evaluation suite to `avar_ops.eval`."""

from avar_ops.analysis.demo import run_demo
from avar_ops.analysis.generation import generate_answers
from avar_ops.analysis.image_attention import ImageAttention, image_attention, save_overlays
from avar_ops.analysis.tiny_qwen import (
    TINY_MAX_POSITIONS,
    build_tiny_processor,
    build_tiny_qwen2_5_vl,
    synthetic_images,
)
from avar_ops.analysis.vas import VASReport, compare, measure

# Moved to avar_ops.grading; still answered here, looked up there when first asked for (PEP 562).
_MOVED_TO_GRADING = tuple(
    "AnswerChecker AnswerSpec CheckResult Extraction check_answer check_answers extract_answer".split()
)

__all__ = [
    "ImageAttention",
    "image_attention",
    "save_overlays",
    "generate_answers",
    "run_demo",
    "build_tiny_processor",
    "TINY_MAX_POSITIONS",
    "build_tiny_qwen2_5_vl",
    "synthetic_images",
    "VASReport",
    "compare",
    "measure",
]
__all__ += _MOVED_TO_GRADING


def __getattr__(name: str):
    if name in _MOVED_TO_GRADING:
        import avar_ops.grading as grading

        return getattr(grading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
