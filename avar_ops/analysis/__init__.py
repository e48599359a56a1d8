"""Analysis and tools: VAS measurement and reports, per-patch image heatmaps, plots, sample files, the tiny
offline Qwen2.5-VL, the demo and the `avar` command line. Needs the `analysis` extra (matplotlib, pillow,
tqdm, torchvision)."""

from avar_ops.analysis.image_attention import ImageAttention, image_attention, save_overlays
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
