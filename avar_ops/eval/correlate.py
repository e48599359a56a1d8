"""Accuracy against VAS across runs (checkpoints or interventions): Pearson r with a Fisher-z confidence
interval, Spearman's rho, per benchmark and for the average, and the scatter plot with the runs labelled.

A run is the folder written by `avar eval`; its ``report.json`` holds per-benchmark accuracy and VAS.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from statistics import NormalDist
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

REPORT_FILE = "report.json"
AVERAGE = "average"


@dataclass(frozen=True)
class Correlation:
    n: int
    pearson: float
    ci_low: float
    ci_high: float
    spearman: float
    confidence: float

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


def pearson(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> Tuple[float, float, float]:
    """Pearson r and its confidence interval from Fisher's z (needs n >= 4 for the interval; else NaN)."""
    x, y = _pair(x, y)
    if not 0 < confidence < 1:
        raise ValueError("confidence: expected a value in (0, 1), got %r" % (confidence,))
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan"), float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    r = float(np.clip((xc @ yc) / math.sqrt((xc @ xc) * (yc @ yc)), -1.0, 1.0))
    if n < 4:
        return r, float("nan"), float("nan")
    if abs(r) == 1.0:
        return r, r, r
    z, se = math.atanh(r), 1.0 / math.sqrt(n - 3)
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * se
    return r, math.tanh(z - half), math.tanh(z + half)


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), dtype=np.float64)
    sorted_v = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = _pair(x, y)
    return pearson(_ranks(x), _ranks(y))[0]


def correlation(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> Correlation:
    r, lo, hi = pearson(x, y, confidence)
    return Correlation(len(x), r, lo, hi, spearman(x, y), confidence)


def _pair(x, y) -> Tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            "x and y: expected two 1-D sequences of equal length, got shapes %s and %s" % (x.shape, y.shape)
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y: expected finite values")
    return x, y


# --- runs -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPoint:
    label: str
    accuracy: Dict[str, float]  # benchmark -> accuracy (%)
    vas: Dict[str, float]  # benchmark -> VAS


def load_run(run_dir: str) -> RunPoint:
    path = os.path.join(run_dir, REPORT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError("%s: no %s (is it a folder written by `avar eval`?)" % (run_dir, REPORT_FILE))
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        label = str(report.get("label") or os.path.basename(os.path.normpath(run_dir)))
        accuracy, vas = {}, {}
        for name, row in report["benchmarks"].items():
            if row.get("accuracy") is not None and row.get("vas") is not None:
                accuracy[name], vas[name] = float(row["accuracy"]), float(row["vas"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError("%s: not a valid `avar eval` report (%s)" % (path, exc)) from exc
    return RunPoint(label, accuracy, vas)


def correlate_runs(runs: Sequence[RunPoint], confidence: float = 0.95) -> Dict[str, dict]:
    """Per benchmark (over the runs that have it) and for the average over the benchmarks every run has."""
    if len(runs) < 3:
        raise ValueError("runs: a correlation needs at least 3 runs, got %d" % len(runs))
    names = sorted({b for r in runs for b in r.accuracy})
    out: Dict[str, dict] = {}
    for name in names:
        have = [r for r in runs if name in r.accuracy]
        if len(have) >= 3:
            c = correlation([r.vas[name] for r in have], [r.accuracy[name] for r in have], confidence)
            out[name] = dict(c.to_dict(), runs=[r.label for r in have])
    common = [b for b in names if all(b in r.accuracy for r in runs)]
    if common:
        xs = [float(np.mean([r.vas[b] for b in common])) for r in runs]
        ys = [float(np.mean([r.accuracy[b] for b in common])) for r in runs]
        out[AVERAGE] = dict(correlation(xs, ys, confidence).to_dict(), runs=[r.label for r in runs], benchmarks=common)
    return out


def average_point(run: RunPoint, benchmarks: Sequence[str]) -> Tuple[float, float]:
    return float(np.mean([run.vas[b] for b in benchmarks])), float(np.mean([run.accuracy[b] for b in benchmarks]))


def markdown_table(result: Dict[str, dict]) -> str:
    def f(v, digits=4):
        return "–" if v is None else ("%.*f" % (digits, v))

    lines = [
        "| benchmark | runs | Pearson r | %d%% CI | Spearman ρ |" % round(100 * _confidence(result)),
        "|---|---|---|---|---|",
    ]
    for name, c in result.items():
        ci = "[%s, %s]" % (f(c["ci_low"]), f(c["ci_high"])) if c["ci_low"] is not None else "–"
        lines.append("| %s | %d | %s | %s | %s |" % (name, c["n"], f(c["pearson"]), ci, f(c["spearman"])))
    return "\n".join(lines) + "\n"


def _confidence(result: Dict[str, dict]) -> float:
    return next(iter(result.values()))["confidence"] if result else 0.95


def scatter_plot(runs: Sequence[RunPoint], result: Dict[str, dict], path: str, benchmark: Optional[str] = None) -> str:
    """Accuracy against VAS with each run labelled and the least-squares line (the average by default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = benchmark or AVERAGE
    if key not in result:
        raise ValueError("benchmark: no correlation for %r (have: %s)" % (key, ", ".join(result)))
    if key == AVERAGE:
        points = [(r.label,) + average_point(r, result[AVERAGE]["benchmarks"]) for r in runs]
    else:
        points = [(r.label, r.vas[key], r.accuracy[key]) for r in runs if key in r.accuracy]
    labels, xs, ys = zip(*points)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.scatter(xs, ys, s=36, zorder=3)
    for label, x, y in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if np.ptp(xs) > 0:
        slope, intercept = np.polyfit(xs, ys, 1)
        grid = np.linspace(min(xs), max(xs), 50)
        ax.plot(grid, slope * grid + intercept, linestyle="--", linewidth=1, color="gray", zorder=2)
    c = result[key]
    title = "Pearson r = %s" % ("%.4f" % c["pearson"] if c["pearson"] is not None else "–")
    if c["ci_low"] is not None:
        title += " [%.2f, %.2f]" % (c["ci_low"], c["ci_high"])
    ax.set_title("%s: %s" % ("Average" if key == AVERAGE else key, title), fontsize=10)
    ax.set_xlabel("VAS")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
