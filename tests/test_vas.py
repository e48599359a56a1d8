"""VAS measurement on the tiny model against VAS computed from eager output_attentions maps; reports, figures,
image attention maps."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_eager import eager_maps, masses_from_maps, tiny_eager, tiny_samples, write_jsonl

from avar_ops.analysis import vas
from avar_ops.analysis.image_attention import image_attention, save_overlays
from avar_ops.core import testing
from avar_ops.data.samples import build_inputs, load_samples
from avar_ops.hf import apply_to_qwen2_5_vl, collect_masses, get_handle, is_patched, revert, token_groups
from avar_ops.method import Intervention

EPS = testing.FP32_MASS_ABS  # each mass of the patched model is within this of the eager one


@pytest.fixture(scope="module")
def tiny():
    return tiny_eager()


@pytest.fixture(scope="module")
def samples():
    return tiny_samples()


@pytest.fixture(scope="module")
def report(tiny, samples):
    model, processor = tiny
    return vas.measure(model, processor, samples, batch_size=2, progress=False, label="tiny")


def _ratio_bound(v, s, eps):
    """Worst case of |v'/s' − v/s| when v, s each move by at most eps (s > eps)."""
    return (eps + eps * v / s) / (s - eps)


def _eager_stats(model, processor, sample):
    """Per-sample VAS statistics straight from the maps, float64, with error bounds for EPS-perturbed masses."""
    maps, groups, _ = eager_maps(model, processor, sample)
    masses = torch.stack(masses_from_maps(maps, groups.key_group))[:, 0]  # [NL, H, L, G]
    user = groups.user_mask[0]  # [L]
    v, s = masses[..., user, 1], masses[..., user, 2]  # [NL, H, n_user]
    assert s.min() > 100 * EPS, "system masses this small would make the bound meaningless"
    ratio = v / s
    n = v.shape[-1]
    sv, ss = v.sum(-1), s.sum(-1)  # [NL, H]
    split = masses[..., user, :].mean(dim=(1, 2))  # [NL, G]
    return {
        "vas_lh": ratio.mean(-1),
        "vas_lh_bound": _ratio_bound(v, s, EPS).mean(-1),
        "vas": ratio.mean(),
        "vas_bound": _ratio_bound(v, s, EPS).mean(),
        "ros_lh": sv / ss,
        "ros_lh_bound": _ratio_bound(sv, ss, n * EPS),
        "ros": sv.sum() / ss.sum(),
        "ros_bound": _ratio_bound(sv.sum(), ss.sum(), v.numel() * EPS),
        "img_lh": v.mean(-1),
        "img": v.mean(),
        "split": split,
    }


@pytest.fixture(scope="module")
def stats(tiny, samples):
    model, processor = tiny
    return [_eager_stats(model, processor, s) for s in samples]


def _mean(stats, key):
    return torch.stack([st[key] for st in stats]).mean(0)


def test_measure_matches_eager_maps(stats, samples, report):
    def mean(key):
        return _mean(stats, key)

    assert report.num_samples == len(samples) and report.skipped == []
    assert abs(report.vas - mean("vas").item()) <= mean("vas_bound").item()
    assert abs(report.ratio_of_sums - mean("ros").item()) <= mean("ros_bound").item()
    assert abs(report.image_mass - mean("img").item()) <= EPS
    got_lh = torch.tensor(report.per_layer_head["vas"], dtype=torch.float64)  # [NL, H]
    assert ((got_lh - mean("vas_lh")).abs() <= mean("vas_lh_bound")).all()
    got_ros = torch.tensor(report.per_layer_head["ratio_of_sums"], dtype=torch.float64)
    assert ((got_ros - mean("ros_lh")).abs() <= mean("ros_lh_bound")).all()
    got_img = torch.tensor(report.per_layer_head["image_mass"], dtype=torch.float64)
    assert ((got_img - mean("img_lh")).abs() <= EPS).all()
    split = mean("split")  # [NL, G]
    for g, name in enumerate(vas.GROUP_NAMES):
        assert np.abs(np.asarray(report.split_per_layer[name]) - split[:, g].numpy()).max() <= EPS
    for st, row in zip(stats, report.per_sample):
        assert abs(row["vas"] - st["vas"].item()) <= st["vas_bound"].item()
    # The figures being compared are far apart relative to the bounds, so a wrong statistic cannot pass.
    assert abs(report.vas - report.ratio_of_sums) > 100 * mean("vas_bound").item()


def test_split_sums_to_one_and_visual_share_is_image_mass(report):
    total = sum(np.asarray(report.split_per_layer[g]) for g in vas.GROUP_NAMES)
    assert np.abs(total - 1.0).max() <= 4 * EPS
    assert (
        np.abs(np.asarray(report.split_per_layer["visual"]) - np.asarray(report.per_layer["image_mass"])).max()
        <= testing.FP64_REDUCTION_REL
    )


def test_batch_size_and_layer_subset(tiny, samples, stats, report):
    model, processor = tiny
    single = vas.measure(model, processor, samples, batch_size=1, progress=False)
    a, b = np.asarray(single.per_layer_head["vas"]), np.asarray(report.per_layer_head["vas"])
    # Padding changes only the rounding of the forward: both are within the bound of the eager value.
    assert (np.abs(a - b) <= 2 * _mean(stats, "vas_lh_bound").numpy()).all()
    assert [r["id"] for r in single.per_sample] == [s["id"] for s in samples]
    sub = vas.measure(model, processor, samples, layers=[0, -1], batch_size=1, progress=False)
    assert sub.layers == [0, 2]
    np.testing.assert_allclose(np.asarray(sub.per_layer_head["vas"]), a[[0, 2]], rtol=testing.FP64_REDUCTION_REL)
    assert abs(sub.vas - a[[0, 2]].mean()) <= testing.FP64_REDUCTION_REL * sub.vas


def test_measure_leaves_model_unpatched_and_respects_caller_patch(tiny, samples, report):
    model, processor = tiny
    assert not is_patched(model)
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor)
    try:
        again = vas.measure(model, processor, samples, batch_size=2, progress=False)
        assert get_handle(model) is handle
    finally:
        revert(model)
    assert again.vas == pytest.approx(report.vas, rel=testing.FP64_REDUCTION_REL)


def _is_nontrivial_png(path, min_side=200, min_colours=20):
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = Image.open(path).convert("RGB")
    assert min(img.size) >= min_side
    colours = len(np.unique(np.asarray(img).reshape(-1, 3), axis=0))
    assert colours >= min_colours, f"{path}: {colours} colours, looks blank"
    return True


def test_report_files_written_and_loadable(report, tmp_path):
    paths = report.save(str(tmp_path / "out"))
    loaded = vas.VASReport.load(str(tmp_path / "out"))
    assert loaded.to_dict() == json.loads(json.dumps(report.to_dict()))
    assert len(loaded.per_layer_head["vas"]) == report.num_layers
    assert len(loaded.per_layer_head["vas"][0]) == report.num_heads
    assert _is_nontrivial_png(paths["heatmap"]) and _is_nontrivial_png(paths["lazy_attention"])
    other = vas.VASReport.from_dict(
        {
            **report.to_dict(),
            "label": "shifted",
            "per_layer": {**report.per_layer, "vas": [2 * x for x in report.per_layer["vas"]]},
        }
    )
    assert _is_nontrivial_png(vas.compare([report, loaded, other], str(tmp_path / "compare.png")))


def test_samples_from_jsonl(tiny, tmp_path, report):
    model, processor = tiny
    path = write_jsonl(tmp_path)
    loaded = load_samples(str(path), limit=2)
    assert [s["id"] for s in loaded] == ["s0", "s1"]
    assert all(os.path.isabs(p) for s in loaded for p in s["images"])
    from_file = vas.measure(model, processor, str(path), progress=False)
    # PNG round trip is lossless, so the file gives the same numbers as the in-memory images.
    assert from_file.vas == pytest.approx(report.vas, rel=1e-6)


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"image": "nope.png", "question": "q"}', "image file not found"),
        ('{"images": [], "question": ""}', "non-empty string"),
        ("{not json", "line 1: not valid JSON"),
        ('{"image": "a.png", "images": ["a.png"], "question": "q"}', "not both"),
    ],
)
def test_bad_samples_raise(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_samples(str(path))


def test_measure_bad_arguments(tiny, samples):
    model, processor = tiny
    with pytest.raises(ValueError, match="layers: index 7 is out of range"):
        vas.measure(model, processor, samples, layers=[7], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        vas.measure(model, processor, samples, batch_size=0, progress=False)
    with pytest.raises(FileNotFoundError, match="data file not found"):
        vas.measure(model, processor, "/nonexistent/data.jsonl", progress=False)


# ------------------------------------------------------------------------------------------ image attention


def test_image_attention_matches_eager_maps(tiny, samples, tmp_path):
    model, processor = tiny
    sample = samples[1]  # two images
    res = image_attention(model, processor, sample, layers=[1, 2])
    maps, groups, inputs = eager_maps(model, processor, sample)
    user = groups.user_mask[0]
    # Attention received per key: mean over user queries and heads, then over the chosen layers.
    received = torch.stack([maps[layer][0][:, user].mean(dim=(0, 1)) for layer in (1, 2)]).mean(0)  # [L]
    expected = received[groups.image_mask[0]]
    grid = inputs["image_grid_thw"]  # [2, 3]
    assert [m.shape for m in res.maps] == [(int(t[1]) // 2, int(t[2]) // 2) for t in grid]
    got = torch.from_numpy(np.concatenate([m.reshape(-1) for m in res.maps]))
    assert (got - expected).abs().max() <= EPS
    assert (expected.max() - expected.min()) > 100 * EPS  # the maps are not flat
    assert res.num_queries == int(user.sum())
    assert res.visual_share == pytest.approx(float(expected.sum()), abs=EPS * len(expected))
    for p in save_overlays(res, sample, str(tmp_path)):
        assert _is_nontrivial_png(p)


def test_image_attention_on_response_tokens_matches_masses(tiny, samples):
    model, processor = tiny
    sample = {**samples[0], "response": "The square is red."}
    res = image_attention(model, processor, sample, layers=[-1], queries="response")
    # Σ over image keys of the received attention = mean over response tokens and heads of the visual mass.
    inputs = build_inputs(processor, [sample], responses=[sample["response"]])
    apply_to_qwen2_5_vl(model, tokenizer=processor)
    try:
        with torch.no_grad(), collect_masses(model) as rec:
            model(**inputs)
    finally:
        revert(model)
    g = token_groups(inputs["input_ids"], processor)
    assert res.num_queries == int(g.response_mask.sum()) > 1
    visual = rec.masses[-1][0][:, g.response_mask[0], 1].double().mean().item()
    assert res.visual_share == pytest.approx(visual, abs=EPS)
    assert res.response == sample["response"]


def test_image_attention_on_generated_response(tiny, samples):
    model, processor = tiny
    res = image_attention(model, processor, samples[2], layers=[0], queries="response", max_new_tokens=5)
    assert isinstance(res.response, str)
    assert 1 <= res.num_queries <= 5  # every generated token is a query, the prompt's are not
    assert 0 < res.visual_share < 1


def test_image_attention_uses_caller_patch_tables(tiny, samples):
    """A model the caller patched keeps its patch, and the maps use the tables it runs with."""
    model, processor = tiny
    iv = Intervention(alpha_img=0.5, alpha_sys=0.3, layers=(1,))
    own = image_attention(model, processor, samples[1], layers=[1, 2], intervention=iv)
    plain = image_attention(model, processor, samples[1], layers=[1, 2])
    tables = iv.tables(3, model.config.text_config.num_attention_heads)
    handle = apply_to_qwen2_5_vl(model, tokenizer=processor, bias=tables.bias)
    try:
        caller = image_attention(model, processor, samples[1], layers=[1, 2])
        assert get_handle(model) is handle
        with pytest.raises(RuntimeError, match="already patched"):
            image_attention(model, processor, samples[1], intervention=iv)
    finally:
        revert(model)
    for a, b in zip(caller.maps, own.maps):
        assert np.abs(a - b).max() <= EPS
    # The intervention moves the maps by far more than the tolerance, so the tables were not ignored.
    assert abs(caller.visual_share - plain.visual_share) > 100 * EPS
