"""Analysis: VAS measurement and reports, per-patch image heatmaps, plots, greedy answers under an
intervention, the tiny offline models of every family (`build_tiny`), what a model argument names
(`model_shape`, `load_model_and_processor`) and the demo. Needs the `analysis` extra (matplotlib, pillow, tqdm,
torchvision).

Moved: answer extraction and checking (`check_answer`, `check_answers`, `extract_answer`, `AnswerChecker`,
`AnswerSpec`, `CheckResult`, `Extraction`), the LaTeX checker and the chat client now live in
`avar_ops.grading`; samples and image loading (`load_samples`, `normalize_sample`, `load_images`,
`chat_messages`, `build_inputs`) in `avar_ops.data`. These names still resolve here, so code written against
`avar_ops.analysis` keeps working. The `avar` command moved to `avar_ops.cli`, the evaluation suite to
`avar_ops.eval`."""

from avar_ops.analysis.demo import run_demo
from avar_ops.analysis.generation import generate_answers
from avar_ops.analysis.image_attention import ImageAttention, image_attention, save_overlays
from avar_ops.analysis.models import ModelShape, ModelSpecError, load_model_and_processor, model_shape, tiny_family
from avar_ops.analysis.tiny_families import TINY_BUILDERS, build_tiny, tiny_family_names
from avar_ops.analysis.tiny_qwen import (
    TINY_MAX_POSITIONS,
    build_tiny_processor,
    build_tiny_qwen2_5_vl,
    synthetic_images,
)
from avar_ops.analysis.vas import VASReport, compare, measure

# Moved out of analysis; still answered here, looked up in their new room when first asked for (PEP 562).
_TO_GRADING = "AnswerChecker AnswerSpec CheckResult Extraction check_answer check_answers extract_answer".split()
_TO_GRADING += "ChatClient ChatClientError LatexChecker".split()
_TO_DATA = "build_inputs chat_messages load_images load_samples normalize_sample".split()

__all__ = [
    "ModelShape",
    "ModelSpecError",
    "load_model_and_processor",
    "model_shape",
    "tiny_family",
    "TINY_BUILDERS",
    "build_tiny",
    "tiny_family_names",
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
__all__ += _TO_GRADING + _TO_DATA


def __getattr__(name: str):
    if name in _TO_GRADING:
        import avar_ops.grading as grading

        return getattr(grading, name)
    if name in _TO_DATA:
        import avar_ops.data as data

        return getattr(data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
