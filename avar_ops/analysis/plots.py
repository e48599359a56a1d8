"""Figures for VAS reports (matplotlib, Agg backend, PNG files).

Inputs are plain arrays and dicts so that reports loaded back from JSON plot the same as fresh ones.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

GROUP_COLORS = {"visual": "#d95f02", "user": "#1b9e77", "system": "#7570b3", "other": "#999999"}
# Stacking order of the lazy-attention bars: the two quantities VAS compares sit next to each other.
SPLIT_ORDER = ("visual", "system", "user", "other")
_LOG_AXIS_SPAN = 20.0
_ANNOTATE_MAX_CELLS = 64  # write the value in each cell only while the numbers stay legible


def _save(fig, path: str) -> str:
    # Folders are the callers' to create (inside the output folder they were given); a figure never makes one.
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        plt.close(fig)
        raise FileNotFoundError(f"cannot save the figure {path!r}: its folder {folder!r} does not exist")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _layer_ticks(ax, axis: str, count: int, labels: Optional[Sequence[int]], where: str) -> None:
    """At most ~14 ticks over `count` layers, labelled with the layers' own indices when given."""
    if labels is not None and len(labels) != count:
        raise ValueError(f"{where}: layer_labels must have one entry per layer ({count}), got {len(labels)}")
    ticks = list(range(0, count, max(1, count // 14)))
    getattr(ax, f"set_{axis}ticks")(ticks)
    if labels is not None:
        getattr(ax, f"set_{axis}ticklabels")([str(labels[t]) for t in ticks])


def vas_heatmap(
    vas_layer_head: np.ndarray,
    path: str,
    *,
    title: str = "VAS per layer and head",
    log_scale: bool = True,
    layer_labels: Optional[Sequence[int]] = None,
) -> str:
    """Heatmap of VAS [layers, heads] (layers on the y axis, the first at the top).

    `layer_labels` names each row's layer (e.g. its decoder-layer index); rows are otherwise numbered from 0.
    """
    data = np.asarray(vas_layer_head, dtype=np.float64)  # [NL, H]
    if data.ndim != 2 or data.size == 0:
        raise ValueError(f"vas_heatmap: expected a non-empty [layers, heads] array, got shape {data.shape}")
    layers, heads = data.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * heads + 2.5), max(3.0, 0.28 * layers + 1.5)))
    shown = data
    label = "VAS"
    finite_pos = data[np.isfinite(data) & (data > 0)]
    if log_scale and finite_pos.size == np.isfinite(data).sum() and finite_pos.size > 0:
        shown = np.log10(data)
        label = "log10 VAS"
    im = ax.imshow(shown, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer" if layer_labels is None else "decoder layer")
    ax.set_xticks(range(0, heads, max(1, heads // 14)))
    _layer_ticks(ax, "y", layers, layer_labels, "vas_heatmap")
    if layers * heads <= _ANNOTATE_MAX_CELLS:
        mid = np.nanmean(shown[np.isfinite(shown)]) if np.isfinite(shown).any() else 0.0
        for (i, j), v in np.ndenumerate(data):
            ax.text(
                j,
                i,
                f"{v:.3g}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if np.isfinite(shown[i, j]) and shown[i, j] > mid else "white",
            )
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    return _save(fig, path)


def lazy_attention_split(
    split: Dict[str, Sequence[float]],
    path: str,
    *,
    title: str = "Where user tokens attend, per layer",
    layer_labels: Optional[Sequence[int]] = None,
) -> str:
    """Stacked bars: per layer, the user tokens' attention split over visual, system, user and other keys.

    `layer_labels` names each bar's layer (e.g. its decoder-layer index); bars are otherwise numbered from 0.
    """
    missing = [g for g in SPLIT_ORDER if g not in split]
    if missing:
        raise ValueError(f"lazy_attention_split: split is missing groups {missing}; has {sorted(split)}")
    layers = len(split["visual"])
    x = np.arange(layers)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * layers + 2.0), 3.6))
    bottom = np.zeros(layers)
    for g in SPLIT_ORDER:
        vals = np.asarray(split[g], dtype=np.float64)  # [NL]
        ax.bar(x, vals, bottom=bottom, color=GROUP_COLORS[g], label=g, width=0.85)
        bottom += vals
    if layer_labels is None:
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.set_xlabel("decoder layer")
        _layer_ticks(ax, "x", layers, layer_labels, "lazy_attention_split")
    ax.set_ylabel("share of user-token attention")
    ax.set_ylim(0, 1.0)
    ax.set_xlim(-0.6, layers - 0.4)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


_DEPTH_LABELS = {
    "attention": "relative depth: (attention layer + 1) / attention layers",
    "decoder": "relative depth: (decoder layer + 1) / decoder layers",
}


def compare_reports(reports: Sequence[dict], path: str, *, title: str = "VAS and attention split by model") -> str:
    """Several models or checkpoints overlaid on relative depth: per-layer VAS (log) and visual / system share.

    Each report is a dict with "label", "vas_per_layer" [NL], "split_per_layer" {group: [NL]}, "depth" [NL]
    (where each layer sits, in (0, 1]) and "depth_axis" (what depth counts: "attention" or "decoder" layers);
    "layers_text" and "num_heads", when present, go into the legend so that it says which layers each curve
    is over. Models with different numbers of layers and heads thus share one axis.
    """
    if not reports:
        raise ValueError("compare_reports: expected at least one report, got none")
    axes_kinds = {rep.get("depth_axis", "attention") for rep in reports}
    if len(axes_kinds) != 1 or not axes_kinds <= set(_DEPTH_LABELS):
        raise ValueError(f"compare_reports: every report must use one depth axis of {sorted(_DEPTH_LABELS)}")
    for rep in reports:
        n = len(rep["vas_per_layer"])
        if len(rep["depth"]) != n or any(len(rep["split_per_layer"][g]) != n for g in ("visual", "system")):
            raise ValueError(f"compare_reports: {rep['label']!r} needs one depth and one share per layer ({n})")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, rep in enumerate(reports):
        color = cycle[i % len(cycle)]
        label = f"{rep['label']} (VAS {rep['vas']:.3g})" if "vas" in rep else rep["label"]
        if "layers_text" in rep:
            heads = f", {rep['num_heads']} heads" if "num_heads" in rep else ""
            label += f"\n{rep['layers_text']}{heads}"
        depth = np.asarray(rep["depth"], dtype=np.float64)  # [NL]
        vas = np.asarray(rep["vas_per_layer"], dtype=np.float64)  # [NL]
        axes[0].plot(depth, vas, marker="o", ms=3, color=color, label=label)
        split = rep["split_per_layer"]
        for ax, g in ((axes[1], "visual"), (axes[2], "system")):
            vals = np.asarray(split[g], dtype=np.float64)  # [NL]
            ax.plot(depth, vals, marker="o", ms=3, color=color, label=rep["label"])
    vas_all = np.concatenate([np.asarray(r["vas_per_layer"], dtype=np.float64) for r in reports])
    # A log axis only pays off when the models differ by more than an order of magnitude.
    if np.all(np.isfinite(vas_all)) and np.all(vas_all > 0) and vas_all.max() > _LOG_AXIS_SPAN * vas_all.min():
        axes[0].set_yscale("log")
    axes[0].set_title("VAS per layer")
    axes[1].set_title("user → visual share")
    axes[2].set_title("user → system share")
    for ax in axes:
        ax.set_xlabel(_DEPTH_LABELS[next(iter(axes_kinds))], fontsize=8)
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def image_attention_overlay(
    image, patch_attention: np.ndarray, path: str, *, title: Optional[str] = None, alpha: float = 0.55
) -> str:
    """Attention received per merged patch [grid_h, grid_w], upsampled onto the image, side by side with it.

    The heat is normalised per image (its maximum is 1) since only where the model looks is compared.
    """
    from PIL import Image

    heat = np.asarray(patch_attention, dtype=np.float64)  # [gh, gw]
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"image_attention_overlay: expected a [grid_h, grid_w] array, got shape {heat.shape}")
    img = image.convert("RGB") if hasattr(image, "convert") else Image.open(image).convert("RGB")  # 8-bit images
    w, h = img.size
    peak = heat.max()
    norm = heat / peak if peak > 0 else heat  # [gh, gw]
    heat_img = Image.fromarray(np.uint8(np.clip(norm, 0, 1) * 255)).resize((w, h), Image.NEAREST)
    heat_px = np.asarray(heat_img, dtype=np.float64) / 255.0  # [h, w]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4 * h / max(w, 1) + 0.6))
    axes[0].imshow(img)
    axes[0].set_title("image")
    axes[1].imshow(img)
    im = axes[1].imshow(heat_px, cmap="jet", alpha=alpha, vmin=0, vmax=1)
    axes[1].set_title(f"attention received ({heat.shape[0]}×{heat.shape[1]} patches)")
    for ax in axes:
        ax.axis("off")
    fig.colorbar(im, ax=axes[1], fraction=0.046, label="relative attention")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
