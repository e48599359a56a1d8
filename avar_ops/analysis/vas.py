"""VAS measurement on Qwen2.5-VL: prefill only, masses from the patched attention, report as JSON and figures.

    report = measure(model, processor, samples, limit=200)
    report.save("out/")           # vas.json, vas_heatmap.png, lazy_attention.png
    compare([report_a, report_b], "out/compare.png")

Numbers (see `avar_ops.method.vas` for the per-sample definitions): the paper's VAS (mean over layers, heads
and user-turn tokens of visual mass / system mass), the ratio of sums and the absolute image mass, overall, per
layer and per layer × head. Every dataset-level number is the equal-weight mean over samples of that sample's
number (as `avar_ops.method.vas` does inside a batch), so batch size does not change the result.

The lazy-attention view: per layer, the mean over samples, heads and user tokens of the share of attention on
visual, system, user-text and other keys (the four shares sum to 1).
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from avar_ops.analysis import plots
from avar_ops.core import GROUP_NAMES, select_indices
from avar_ops.data import build_inputs, check_unique_ids, load_samples, normalize_sample
from avar_ops.hf import attention_layer_indices, collect_masses, token_groups
from avar_ops.method import VASResult, intervened
from avar_ops.method import vas as vas_metric

__all__ = ["VASReport", "measure", "compare"]
_STATS = ("vas", "ratio_of_sums", "image_mass")


@dataclass
class VASReport:
    label: str
    num_layers: int
    num_heads: int
    layers: List[int]  # the decoder layers the numbers are over
    num_samples: int  # samples that entered the means
    vas: float
    ratio_of_sums: float
    image_mass: float
    per_layer: Dict[str, List[float]]  # stat -> [NL]
    per_layer_head: Dict[str, List[List[float]]]  # stat -> [NL][H]
    split_per_layer: Dict[str, List[float]]  # group name -> [NL]
    split: Dict[str, float]  # group name -> mean over layers
    per_sample: List[dict]
    skipped: List[dict] = field(default_factory=list)  # {"id", "reason"}
    eps: float = 0.0
    intervention: Optional[dict] = None

    @property
    def vas_layer_head(self) -> np.ndarray:
        return np.asarray(self.per_layer_head["vas"], dtype=np.float64)  # [NL, H]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "VASReport.from_dict") -> "VASReport":
        """The report a `to_dict` gave; ValueError naming what is missing or of the wrong kind."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing, unknown = sorted(required - set(d)), sorted(set(d) - known)
        if missing or unknown:
            raise ValueError(f"{where}: not a VAS report (missing fields {missing}, unknown fields {unknown})")
        for name in ("vas", "ratio_of_sums", "image_mass"):
            if isinstance(d[name], bool) or not isinstance(d[name], (int, float)):
                raise ValueError(f"{where}: field {name!r} must be a number, got {d[name]!r}")
        for name in ("per_layer", "split_per_layer", "split", "per_layer_head"):
            if not isinstance(d[name], dict):
                raise ValueError(f"{where}: field {name!r} must be an object, got {type(d[name]).__name__}")
        if "vas" not in d["per_layer"] or any(g not in d["split_per_layer"] for g in GROUP_NAMES):
            raise ValueError(f"{where}: per_layer needs 'vas' and split_per_layer needs {list(GROUP_NAMES)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str) -> "VASReport":
        """Read a report from a vas.json file or a folder holding one (ValueError for a file that is not one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "vas.json")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a VAS report (not UTF-8 text)") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a VAS report (invalid JSON at line {exc.lineno}: {exc.msg})") from None
        return cls.from_dict(data, where=path)

    def plot_data(self) -> dict:
        return {
            "label": self.label,
            "vas": self.vas,
            "vas_per_layer": self.per_layer["vas"],
            "split_per_layer": self.split_per_layer,
        }

    def save(self, out_dir: str, *, figures: bool = True) -> Dict[str, str]:
        """Write vas.json and (figures=True) vas_heatmap.png and lazy_attention.png; returns their paths."""
        os.makedirs(out_dir, exist_ok=True)
        paths = {"json": os.path.join(out_dir, "vas.json")}
        with open(paths["json"], "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
        if figures:
            paths["heatmap"] = plots.vas_heatmap(
                self.vas_layer_head,
                os.path.join(out_dir, "vas_heatmap.png"),
                title=f"VAS per layer and head: {self.label} (VAS {self.vas:.3g}, n={self.num_samples})",
            )
            paths["lazy_attention"] = plots.lazy_attention_split(
                self.split_per_layer,
                os.path.join(out_dir, "lazy_attention.png"),
                title=f"Where user tokens attend, per layer: {self.label}",
            )
        return paths

    def summary(self) -> str:
        s = self.split
        return (
            f"{self.label}: VAS {self.vas:.4g} | ratio of sums {self.ratio_of_sums:.4g} | image mass "
            f"{self.image_mass:.4g} | user-token attention: visual {s['visual']:.3f}, system {s['system']:.3f},"
            f" user {s['user']:.3f}, other {s['other']:.3f} | {self.num_samples} samples"
        )


def compare(reports: Sequence[VASReport], path: str) -> str:
    """One figure with every report's per-layer VAS and visual / system shares overlaid."""
    return plots.compare_reports([r.plot_data() for r in reports], path)


def _text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


class _UserRows:
    """collect_masses reduction: keep only the query rows that are user tokens in some sample of the batch."""

    def __init__(self, columns: torch.Tensor):
        self.columns = columns  # int64 [L']

    def __call__(self, mass: torch.Tensor) -> torch.Tensor:  # [B, H, L, G] -> [B, H, L', G]
        return mass.detach().index_select(2, self.columns).float().cpu()


class _Accumulator:
    """Sums of per-sample statistics, so that dataset means are equal-weight means over samples."""

    def __init__(self, num_layers: int, num_heads: int):
        self.n = 0
        self.per_layer_head = {s: np.zeros((num_layers, num_heads)) for s in _STATS}  # stat -> [NL, H]
        self.per_layer = {s: np.zeros(num_layers) for s in _STATS}  # stat -> [NL]
        self.overall = {s: 0.0 for s in _STATS}
        self.split = np.zeros((num_layers, len(GROUP_NAMES)))  # [NL, G]

    def add(self, result: VASResult, split: np.ndarray, n_valid: int) -> None:
        # metrics.vas returns the mean over the batch's valid samples; scaling by their count gives the sum.
        for s in _STATS:
            red = getattr(result, s)
            self.per_layer_head[s] += n_valid * red.per_layer_head.numpy()
            self.per_layer[s] += n_valid * red.per_layer.numpy()
            self.overall[s] += n_valid * float(red.overall)
        self.split += split
        self.n += n_valid


def measure(
    model,
    processor,
    samples,
    *,
    limit: Optional[int] = None,
    layers: Optional[Sequence[int]] = None,
    batch_size: int = 1,
    progress: bool = True,
    label: str = "model",
    intervention=None,
    eps: float = 0.0,
) -> VASReport:
    """Measure VAS and the lazy-attention split of `model` on `samples` (prefill only, no generation).

    Args:
        model: Qwen2_5_VLForConditionalGeneration (patched here unless already patched, see
            `avar_ops.hf.patched`).
        processor: its processor (chat template, tokenizer, image processor).
        samples: dicts / JSONL records (see `avar_ops.data.samples`), or a path to a JSONL file.
        limit: use the first `limit` samples.
        layers: decoder layers to average over (default all; negative indices count from the end).
        batch_size: samples per forward (left-padded); the result does not depend on it.
        intervention: an `avar_ops.method.Intervention` to measure the model under.
        eps: see `avar_ops.method.vas` (0 = the paper's ratio).
    """
    if isinstance(samples, (str, os.PathLike)):
        samples = load_samples(os.fspath(samples), limit)
    else:
        samples = [normalize_sample(s, i) for i, s in enumerate(samples)]
        check_unique_ids(samples)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"measure: limit must be a positive int or None, got {limit!r}")
        samples = samples[:limit]
    if not samples:
        raise ValueError("measure: no samples")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"measure: batch_size must be a positive int, got {batch_size!r}")
    text_cfg = _text_config(model)
    # Softmax-attention layers only (Qwen3.5's linear-attention layers have no masses).
    num_layers, num_heads = len(attention_layer_indices(model.config)), int(text_cfg.num_attention_heads)
    layer_ids = select_indices(layers, num_layers, "measure: layers") or list(range(num_layers))
    device = next(model.parameters()).device

    acc = _Accumulator(len(layer_ids), num_heads)
    per_sample, skipped = [], []
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    bar = _progress(len(samples), progress, label)
    with intervened(model, processor, intervention), torch.no_grad():
        for batch in batches:
            inputs = build_inputs(processor, batch, device=device)
            groups = token_groups(inputs["input_ids"], processor, inputs.get("attention_mask"))
            user = groups.user_mask  # [B, L]
            columns = torch.nonzero(user.any(0)).flatten()  # [L']
            with collect_masses(model, reduce=_UserRows(columns)) as rec:
                model(**inputs, use_cache=False)
            masses = [rec.masses[i] for i in layer_ids]  # each [B, H, L', G]
            query = user.index_select(1, columns).cpu()  # [B, L']
            result = vas_metric(masses, query, eps=eps, empty="skip") if bool(query.any()) else None
            valid = result.valid if result is not None else torch.zeros(len(batch), dtype=torch.bool)
            stacked = torch.stack(masses).to(torch.float64)  # [NL, B, H, L', G]
            qw = query.to(torch.float64)  # [B, L']
            n_query = qw.sum(-1).clamp(min=1)  # [B]
            # Per sample and layer: mean over heads and user tokens of each group's share.
            split = (stacked * qw[None, :, None, :, None]).sum(3).mean(2) / n_query[None, :, None]  # [NL, B, G]
            split = split[:, valid].sum(1).numpy()  # [NL, G]
            if result is not None:
                acc.add(result, split, int(valid.sum()))
            for b, s in enumerate(batch):
                counts = {
                    "user_tokens": int(user[b].sum()),
                    "image_tokens": int(groups.image_mask[b].sum()),
                    "system_tokens": int(groups.system_mask[b].sum()),
                }
                if bool(valid[b]):
                    per_sample.append(
                        {"id": s["id"], **{k: float(getattr(result, k).per_sample[b]) for k in _STATS}, **counts}
                    )
                else:
                    reason = "no user-text token" if counts["user_tokens"] == 0 else "zero system mass on a query"
                    skipped.append({"id": s["id"], "reason": reason, **counts})
            bar.update(len(batch))
    bar.close()
    if acc.n == 0:
        raise ValueError(f"measure: no sample could be measured; skipped: {skipped}")

    n = acc.n
    split_per_layer = {g: (acc.split[:, i] / n).tolist() for i, g in enumerate(GROUP_NAMES)}
    return VASReport(
        label=label,
        num_layers=num_layers,
        num_heads=num_heads,
        layers=layer_ids,
        num_samples=n,
        vas=acc.overall["vas"] / n,
        ratio_of_sums=acc.overall["ratio_of_sums"] / n,
        image_mass=acc.overall["image_mass"] / n,
        per_layer={s: (acc.per_layer[s] / n).tolist() for s in _STATS},
        per_layer_head={s: (acc.per_layer_head[s] / n).tolist() for s in _STATS},
        split_per_layer=split_per_layer,
        split={g: float(np.mean(v)) for g, v in split_per_layer.items()},
        per_sample=per_sample,
        skipped=skipped,
        eps=float(eps),
        intervention=intervention.to_dict() if intervention is not None else None,
    )


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool, label: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"VAS {label}", unit="sample")
