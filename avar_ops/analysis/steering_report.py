"""What a steering file learned: layer × head heatmaps of β and γ per key group, and the rows that moved most.

"Moved" is measured from the identity (β = 0, γ = 1), the tables of plain attention: a (layer, head) row's
movement is the largest |β[g]| and |γ[g] − 1| over its four groups, so one number ranks rows whatever table or
group moved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List

import numpy as np

from avar_ops.core import GROUP_NAMES

__all__ = ["SteeringMove", "steering_moves", "steering_heatmaps", "moves_table"]


@dataclass(frozen=True)
class SteeringMove:
    layer: int  # decoder index
    head: int
    moved: float  # max over groups of |β| and |γ − 1|
    bias: tuple  # β per group
    logit_scale: tuple  # γ per group

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "head": self.head,
            "moved": self.moved,
            "bias": dict(zip(GROUP_NAMES, self.bias)),
            "logit_scale": dict(zip(GROUP_NAMES, self.logit_scale)),
        }


def steering_moves(steering, top: int = 10) -> List[SteeringMove]:
    """The `top` (layer, head) rows of a `avar_ops.hf.Steering` that moved most from the identity, largest first
    (ties by layer, then head)."""
    bias = steering.bias.double().numpy()  # [L, H, G]
    scale = steering.logit_scale.double().numpy()  # [L, H, G]
    moved = np.maximum(np.abs(bias), np.abs(scale - 1.0)).max(-1)  # [L, H]
    rows = []
    for i, layer in enumerate(steering.attention_layers):
        for h in range(steering.num_heads):
            rows.append(
                SteeringMove(
                    layer=int(layer),
                    head=h,
                    moved=float(moved[i, h]),
                    bias=tuple(float(v) for v in bias[i, h]),
                    logit_scale=tuple(float(v) for v in scale[i, h]),
                )
            )
    rows.sort(key=lambda r: (-r.moved, r.layer, r.head))
    return rows[: max(0, int(top))]


def moves_table(moves: List[SteeringMove]) -> str:
    """A plain-text table of the rows (one line each), as `avar steer-report` prints it."""
    groups = " ".join(f"{'β_' + g:>9s}" for g in GROUP_NAMES) + " " + " ".join(f"{'γ_' + g:>9s}" for g in GROUP_NAMES)
    lines = [f"{'layer':>5s} {'head':>4s} {'moved':>7s} {groups}"]
    for m in moves:
        values = " ".join(f"{v:9.4f}" for v in (*m.bias, *m.logit_scale))
        lines.append(f"{m.layer:5d} {m.head:4d} {m.moved:7.4f} {values}")
    return "\n".join(lines)


def steering_heatmaps(steering, out_dir: str) -> Dict[str, str]:
    """steering_bias.png and steering_logit_scale.png in `out_dir` (which must exist): per group, a layer × head
    heatmap centred on the identity (β = 0, γ = 1), one colour scale per table. Returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(steering.attention_layers)
    paths = {}
    for name, table, identity, label in (
        ("bias", steering.bias, 0.0, "β (logit offset)"),
        ("logit_scale", steering.logit_scale, 1.0, "γ (logit scale)"),
    ):
        data = table.double().numpy()  # [L, H, G]
        span = float(np.abs(data - identity).max()) or 1e-6
        heads = steering.num_heads
        fig, axes = plt.subplots(
            1, len(GROUP_NAMES), figsize=(max(8.0, 4 * (0.3 * heads + 1.2)), max(3.0, 0.25 * len(layers) + 1.8))
        )
        for g, (ax, group) in enumerate(zip(axes, GROUP_NAMES)):
            im = ax.imshow(
                data[:, :, g],
                aspect="auto",
                cmap="RdBu_r",
                vmin=identity - span,
                vmax=identity + span,
                interpolation="nearest",
            )
            ax.set_title(f"{group} keys")
            ax.set_xlabel("head")
            ax.set_xticks(range(0, heads, max(1, heads // 8)))
            ticks = list(range(0, len(layers), max(1, len(layers) // 14)))
            ax.set_yticks(ticks)
            ax.set_yticklabels([str(layers[t]) for t in ticks])
            if g == 0:
                ax.set_ylabel("layer")
        name_shown = os.path.basename(steering.path or "tables")
        fig.suptitle(f"{label} per layer and head, by key group ({name_shown})", y=1.06)
        fig.colorbar(im, ax=list(axes), label=label)
        path = os.path.join(out_dir, f"steering_{name}.png")
        if not os.path.isdir(out_dir):
            plt.close(fig)
            raise FileNotFoundError(f"cannot save the figure {path!r}: its folder {out_dir!r} does not exist")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths[name] = path
    return paths
