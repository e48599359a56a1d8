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

__all__ = ["VASReport", "measure", "compare", "comparison", "DEPTH_AXES"]
_STATS = ("vas", "ratio_of_sums", "image_mass")


@dataclass
class VASReport:
    label: str
    num_layers: int  # the model's softmax-attention layers (all decoder layers but in hybrid decoders)
    num_heads: int
    layers: List[int]  # the attention layers the numbers are over, counted among the attention layers
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
    # The decoder-layer index of each of the model's attention layers ([num_layers]; reports written before
    # hybrid decoders were measured have none: there every decoder layer is an attention layer).
    attention_layers: Optional[List[int]] = None
    num_decoder_layers: Optional[int] = None
    model_type: Optional[str] = None  # the checkpoint config's model_type ("qwen2_5_vl", "qwen3_5", ...)

    @property
    def vas_layer_head(self) -> np.ndarray:
        return np.asarray(self.per_layer_head["vas"], dtype=np.float64)  # [NL, H]

    @property
    def decoder_layers(self) -> List[int]:
        """The decoder-layer index of each layer the numbers are over (`layers` mapped to the decoder)."""
        table = self.attention_layers if self.attention_layers is not None else range(self.num_layers)
        return [int(table[i]) for i in self.layers]

    def relative_depth(self, axis: str = "attention") -> List[float]:
        """Where each measured layer sits in the model, in (0, 1]: (index + 1) / count.

        `axis="attention"` counts among the attention layers (the k-th of n attention layers is at k / n);
        `axis="decoder"` places each at its decoder layer (decoder layer d of D at (d + 1) / D), which for a
        hybrid decoder (Qwen3.5: one softmax layer in four) says how deep the layer really is. Either way the
        last layer is at 1, so models of different depths overlay on one axis.
        """
        if axis == "attention":
            return [(i + 1) / self.num_layers for i in self.layers]
        if axis == "decoder":
            total = self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers
            return [(d + 1) / total for d in self.decoder_layers]
        raise ValueError(f"VASReport.relative_depth: axis must be 'attention' or 'decoder', got {axis!r}")

    def layers_text(self) -> str:
        """Which layers the numbers are over, in words (for figures and summaries)."""
        text = f"attention layers {_index_list(self.layers)} of {self.num_layers}"
        if self.decoder_layers != list(self.layers) or (self.num_decoder_layers or self.num_layers) != self.num_layers:
            text += f" (decoder layers {_index_list(self.decoder_layers)} of {self.num_decoder_layers})"
        return text

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
        _check_layers(d, where)
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

    def plot_data(self, depth: str = "attention") -> dict:
        """What the comparison figure draws of this report, the layers included (see `compare`)."""
        return {
            "label": self.label,
            "model_type": self.model_type,
            "vas": self.vas,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_decoder_layers or self.num_layers,
            "layers": list(self.layers),
            "decoder_layers": self.decoder_layers,
            "layers_text": self.layers_text(),
            "depth_axis": depth,
            "depth": self.relative_depth(depth),
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
                title=f"VAS per layer and head: {self.label} (VAS {self.vas:.3g}, n={self.num_samples})\n"
                f"{self.layers_text()}",
                layer_labels=self.decoder_layers,
            )
            paths["lazy_attention"] = plots.lazy_attention_split(
                self.split_per_layer,
                os.path.join(out_dir, "lazy_attention.png"),
                title=f"Where user tokens attend, per layer: {self.label}\n{self.layers_text()}",
                layer_labels=self.decoder_layers,
            )
        return paths

    def summary(self) -> str:
        s = self.split
        return (
            f"{self.label}: VAS {self.vas:.4g} | ratio of sums {self.ratio_of_sums:.4g} | image mass "
            f"{self.image_mass:.4g} | user-token attention: visual {s['visual']:.3f}, system {s['system']:.3f},"
            f" user {s['user']:.3f}, other {s['other']:.3f} | {self.num_samples} samples | {self.layers_text()}"
        )


def _index_list(indices: Sequence[int]) -> str:
    """[0, 1, 2, 3] -> "0-3", [3, 7, 11, 15] -> "3-15 every 4", [1, 5] -> "1, 5"."""
    idx = [int(i) for i in indices]
    steps = {b - a for a, b in zip(idx, idx[1:])}
    if len(idx) > 2 and len(steps) == 1 and next(iter(steps)) > 0:
        step = next(iter(steps))
        return f"{idx[0]}-{idx[-1]}" + (f" every {step}" if step > 1 else "")
    return ", ".join(str(i) for i in idx)


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_layers(d: dict, where: str) -> None:
    """The layer fields of a report agree with each other and with its per-layer lists."""
    n = d["num_layers"]
    if not _is_index(n) or n <= 0:
        raise ValueError(f"{where}: num_layers must be a positive int, got {n!r}")
    layers = d["layers"]
    if not isinstance(layers, list) or not layers or not all(_is_index(i) and 0 <= i < n for i in layers):
        raise ValueError(f"{where}: layers must be a non-empty list of indices in [0, {n}), got {layers!r}")
    got = d["per_layer"]["vas"]
    if not isinstance(got, list) or len(got) != len(layers):
        raise ValueError(f"{where}: per_layer['vas'] must have one value per layer ({len(layers)})")
    attn, total = d.get("attention_layers"), d.get("num_decoder_layers")
    if total is not None and (not _is_index(total) or total < n):
        raise ValueError(f"{where}: num_decoder_layers must be an int >= num_layers ({n}), got {total!r}")
    if attn is not None:
        bound = total if total is not None else n
        ok = isinstance(attn, list) and len(attn) == n and all(_is_index(i) and 0 <= i < bound for i in attn)
        if not ok or any(b <= a for a, b in zip(attn, attn[1:])):
            raise ValueError(
                f"{where}: attention_layers must list {n} increasing decoder-layer indices in [0, {bound}), "
                f"got {attn!r}"
            )


DEPTH_AXES = ("attention", "decoder")


def comparison(reports: Sequence[VASReport], depth: str = "attention") -> dict:
    """What `compare` draws, as JSON-ready data: per report its layers, their relative depth and the curves."""
    if depth not in DEPTH_AXES:
        raise ValueError(f"compare: depth must be one of {list(DEPTH_AXES)}, got {depth!r}")
    if not reports:
        raise ValueError("compare: expected at least one report, got none")
    return {"depth_axis": depth, "reports": [r.plot_data(depth) for r in reports]}


def compare(
    reports: Sequence[VASReport], path: str, *, depth: str = "attention", json_path: Optional[str] = None
) -> str:
    """One figure with every report's per-layer VAS and visual / system shares overlaid on relative depth.

    Models of different families differ in layer and head counts, so curves are placed by relative depth
    (`VASReport.relative_depth`): `depth="attention"` by position among the attention layers, `"decoder"` by
    decoder depth (they differ only for hybrid decoders such as Qwen3.5's). The legend names the layers each
    curve is over; `json_path`, if given, gets the same data (`comparison`). Returns the figure's path.
    """
    data = comparison(reports, depth)
    if json_path is not None:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
    return plots.compare_reports(data["reports"], path)


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
        layers: attention layers to average over, counted among the softmax-attention layers (default all;
            negative indices count from the end); the report's `attention_layers` maps them to decoder layers.
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
    num_decoder_layers, num_heads = int(text_cfg.num_hidden_layers), int(text_cfg.num_attention_heads)
    # Softmax-attention layers only (Qwen3.5's linear-attention layers have no masses), by decoder index.
    attention_layers = attention_layer_indices(model.config)
    num_layers = len(attention_layers)
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
            # A batch in which no sample has both user text and a system turn has nothing to measure (vas would
            # refuse it); its samples are skipped below with the reason.
            measurable = bool((query.any(1) & groups.system_mask.any(1).cpu()).any()) or eps > 0
            result = vas_metric(masses, query, eps=eps, empty="skip") if measurable and bool(query.any()) else None
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
                    if counts["user_tokens"] == 0:
                        reason = "no user-text token"
                    elif counts["system_tokens"] == 0:
                        # VAS divides by the system mass; templates such as Qwen3.5's add no default system turn.
                        reason = "no system turn (give the sample a system prompt)"
                    else:
                        reason = "zero system mass on a query"
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
        attention_layers=attention_layers,
        num_decoder_layers=num_decoder_layers,
        model_type=getattr(model.config, "model_type", None),
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
