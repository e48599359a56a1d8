"""VAS-accuracy correlation on fabricated runs whose r is known by construction."""

import json
import math
import os

import numpy as np
import pytest

from avar_ops.eval.correlate import (
    correlate_runs,
    load_run,
    markdown_table,
    pearson,
    scatter_plot,
    spearman,
)


def known_r_pair(r, n=7):
    """x and y with Pearson r exactly `r`: y = x + e with e centred and orthogonal to x - mean(x)."""
    x = np.arange(n, dtype=np.float64)
    xc = x - x.mean()
    e = np.array([(-1) ** i for i in range(n)], dtype=np.float64)
    e -= e.mean()
    e -= (e @ xc) / (xc @ xc) * xc
    # r = |xc| / sqrt(|xc|^2 + s^2 |e|^2)  =>  s = |xc| sqrt(1/r^2 - 1) / |e|
    s = np.linalg.norm(xc) * math.sqrt(1 / r**2 - 1) / np.linalg.norm(e)
    return x * 2.0 + 5.0, x + s * e + 40.0


@pytest.mark.parametrize("r", [0.9616, 0.5, 0.1])
def test_pearson_recovers_a_constructed_r(r):
    x, y = known_r_pair(r)
    got, lo, hi = pearson(x, y)
    assert got == pytest.approx(r, abs=1e-12)
    assert got == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    # Fisher z by hand: z = atanh r, se = 1/sqrt(n-3) = 1/2 for n = 7, 97.5% normal quantile 1.959964
    z = math.atanh(r)
    assert (lo, hi) == pytest.approx((math.tanh(z - 1.959964 / 2), math.tanh(z + 1.959964 / 2)), abs=1e-6)
    assert lo < got < hi


def test_pearson_edge_cases():
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == (1.0, 1.0, 1.0)
    r, lo, hi = pearson([1, 2, 3], [1, 3, 2])
    assert r == pytest.approx(0.5) and math.isnan(lo) and math.isnan(hi)  # no interval for n = 3
    assert all(math.isnan(v) for v in pearson([1, 1, 1, 1], [1, 2, 3, 4]))  # constant x
    with pytest.raises(ValueError, match="equal length"):
        pearson([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        pearson([1, 2, float("nan")], [1, 2, 3])
    with pytest.raises(ValueError, match="confidence"):
        pearson([1, 2, 3, 4], [1, 2, 3, 5], confidence=1.5)


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6·4 / (5·24)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))  # tied ranks 2.5


def write_run(root, label, acc, vas):
    run = os.path.join(root, label)
    os.makedirs(run)
    benchmarks = {name: {"accuracy": a, "vas": v} for name, (a, v) in zip(("mathvista", "mmstar"), zip(acc, vas))}
    with open(os.path.join(run, "report.json"), "w") as f:
        json.dump({"label": label, "benchmarks": benchmarks}, f)
    return run


def test_correlate_fabricated_runs(tmp_path):
    vas, acc = known_r_pair(0.9616)
    runs = [
        load_run(write_run(str(tmp_path), "ckpt%d" % i, (acc[i], acc[i] + 2.0), (vas[i], vas[i] * 3.0)))
        for i in range(len(vas))
    ]
    result = correlate_runs(runs)
    assert set(result) == {"mathvista", "mmstar", "average"}
    for name in result:  # affine changes of either variable keep r
        assert result[name]["pearson"] == pytest.approx(0.9616, abs=1e-9)
        assert result[name]["n"] == 7
    assert result["average"]["benchmarks"] == ["mathvista", "mmstar"]
    assert result["average"]["runs"] == ["ckpt%d" % i for i in range(7)]
    table = markdown_table(result)
    assert "| average | 7 | 0.9616 |" in table and "95% CI" in table
    for key in (None, "mmstar"):
        path = scatter_plot(runs, result, str(tmp_path / ("plot_%s.png" % key)), benchmark=key)
        assert os.path.getsize(path) > 1000
    with pytest.raises(ValueError, match="at least 3 runs"):
        correlate_runs(runs[:2])


def test_load_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no report.json"):
        load_run(str(tmp_path))
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid `avar eval` report"):
        load_run(str(tmp_path))
