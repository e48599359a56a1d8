"""VAS across models of different families and depths: reports say which layers they are over (attention layers
and their decoder indices), comparisons place curves by relative depth, and the figure and compare.json say
which layers each curve uses. Two tiny models of different families and layer counts (Qwen2.5-VL, 3 decoder
layers, all softmax attention; Qwen3.5, 4 decoder layers of which 1 and 3 are softmax attention) are measured
and compared end to end, through the API and through `avar vas --compare`."""

import json
import os

import numpy as np
import pytest
import torch
from tiny_eager import masses_from_maps, tiny_samples, write_jsonl

from avar_ops.analysis import plots, vas
from avar_ops.analysis.tiny_families import qwen3_5
from avar_ops.analysis.tiny_qwen import build_tiny_qwen2_5_vl
from avar_ops.cli import main
from avar_ops.data.samples import build_inputs
from avar_ops.hf import token_groups


def _report(label, num_layers, layers, attention_layers=None, num_decoder_layers=None, heads=2, seed=0):
    """A report with made-up numbers: only the layer bookkeeping matters here."""
    rng = np.random.default_rng(seed)
    n = len(layers)
    per_layer = {s: rng.uniform(0.1, 2.0, n).tolist() for s in ("vas", "ratio_of_sums", "image_mass")}
    split = {g: rng.uniform(0, 0.25, n).tolist() for g in ("other", "visual", "system", "user")}
    return vas.VASReport(
        label=label,
        num_layers=num_layers,
        num_heads=heads,
        layers=list(layers),
        num_samples=1,
        vas=float(np.mean(per_layer["vas"])),
        ratio_of_sums=1.0,
        image_mass=0.1,
        per_layer=per_layer,
        per_layer_head={s: [[v] * heads for v in per_layer[s]] for s in per_layer},
        split_per_layer=split,
        split={g: float(np.mean(v)) for g, v in split.items()},
        per_sample=[],
        attention_layers=attention_layers,
        num_decoder_layers=num_decoder_layers,
    )


def test_relative_depth_counts_attention_layers_or_decoder_layers():
    # A hybrid decoder of 8 layers whose layers 1, 3, 4 and 7 have softmax attention; VAS over the last three.
    hybrid = _report("hybrid", 4, [1, 2, 3], attention_layers=[1, 3, 4, 7], num_decoder_layers=8)
    assert hybrid.decoder_layers == [3, 4, 7]
    assert hybrid.relative_depth("attention") == [2 / 4, 3 / 4, 4 / 4]
    assert hybrid.relative_depth("decoder") == [4 / 8, 5 / 8, 8 / 8]
    assert "attention layers 1-3 of 4" in hybrid.layers_text()
    assert "decoder layers 3, 4, 7 of 8" in hybrid.layers_text()
    # A plain decoder: both axes agree, and a report written before hybrid decoders (no attention_layers)
    # reads as one whose every decoder layer is an attention layer.
    plain = _report("plain", 3, [0, 1, 2])
    assert plain.decoder_layers == [0, 1, 2]
    assert plain.relative_depth("attention") == plain.relative_depth("decoder") == [1 / 3, 2 / 3, 1.0]
    assert plain.layers_text() == "attention layers 0-2 of 3"
    with pytest.raises(ValueError, match="axis must be 'attention' or 'decoder'"):
        plain.relative_depth("layer")


def test_report_layer_fields_are_checked_on_load(tmp_path):
    good = _report("hybrid", 2, [0, 1], attention_layers=[1, 3], num_decoder_layers=4).to_dict()
    assert vas.VASReport.from_dict(good).decoder_layers == [1, 3]
    legacy = {k: v for k, v in good.items() if k not in ("attention_layers", "num_decoder_layers", "model_type")}
    assert vas.VASReport.from_dict(legacy).decoder_layers == [0, 1]
    bad = [
        ({"attention_layers": [1]}, "attention_layers must list 2 increasing"),
        ({"attention_layers": [3, 1]}, "attention_layers must list 2 increasing"),
        ({"attention_layers": [1, 4]}, r"decoder-layer indices in \[0, 4\)"),
        ({"num_decoder_layers": 1}, "num_decoder_layers must be an int >= num_layers"),
        ({"layers": [0, 2]}, r"layers must be a non-empty list of indices in \[0, 2\)"),
        ({"layers": [0]}, "per_layer\\['vas'\\] must have one value per layer"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            vas.VASReport.from_dict({**good, **change})


def test_compare_places_curves_by_relative_depth_and_names_their_layers(tmp_path, monkeypatch):
    """The figure's x data are the relative depths, its legend names each curve's layers, and the JSON holds
    the same; models of different layer and head counts go on one axis."""
    plain = _report("plain", 3, [0, 1, 2], heads=4, seed=1)
    hybrid = _report("hybrid", 2, [0, 1], attention_layers=[1, 3], num_decoder_layers=4, heads=2, seed=2)
    drawn = {}
    real_save = plots._save

    def keep(fig, path):
        drawn["lines"] = [[(ln.get_xdata().tolist(), ln.get_ydata().tolist()) for ln in ax.lines] for ax in fig.axes]
        drawn["legend"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        drawn["xlabel"] = fig.axes[0].get_xlabel()
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    for depth, expect_hybrid in (("attention", [0.5, 1.0]), ("decoder", [0.5, 1.0])):
        png, js = tmp_path / f"{depth}.png", tmp_path / f"{depth}.json"
        assert vas.compare([plain, hybrid], str(png), depth=depth, json_path=str(js)) == str(png)
        assert os.path.getsize(png) > 1000
        data = json.loads(js.read_text())
        assert data["depth_axis"] == depth
        rows = {r["label"]: r for r in data["reports"]}
        assert rows["hybrid"]["layers"] == [0, 1] and rows["hybrid"]["decoder_layers"] == [1, 3]
        assert rows["hybrid"]["num_decoder_layers"] == 4 and rows["hybrid"]["num_layers"] == 2
        assert rows["hybrid"]["depth"] == pytest.approx(expect_hybrid)
        assert rows["plain"]["depth"] == pytest.approx([1 / 3, 2 / 3, 1.0])
        assert rows["plain"]["decoder_layers"] == [0, 1, 2]
        # Three panels (VAS, visual share, system share), one line per report each, at the relative depths.
        for panel, key in zip(drawn["lines"], ("vas", "visual", "system")):
            for (x, y), rep in zip(panel, (plain, hybrid)):
                assert x == pytest.approx(rep.relative_depth(depth))
                want = rep.per_layer["vas"] if key == "vas" else rep.split_per_layer[key]
                assert y == pytest.approx(want)
        assert depth in drawn["xlabel"]
        assert "decoder layers 1, 3 of 4" in drawn["legend"][1] and "2 heads" in drawn["legend"][1]
        assert "attention layers 0-2 of 3" in drawn["legend"][0] and "4 heads" in drawn["legend"][0]
    # Where the two axes differ: attention layers at decoder 0 and 5 of 8.
    odd = _report("odd", 2, [0, 1], attention_layers=[0, 5], num_decoder_layers=8)
    data = vas.comparison([odd], depth="decoder")
    assert data["reports"][0]["depth"] == pytest.approx([1 / 8, 6 / 8])
    with pytest.raises(ValueError, match="depth must be one of"):
        vas.comparison([odd], depth="layers")
    with pytest.raises(ValueError, match="at least one report"):
        vas.comparison([])


SYSTEM = "You are a careful visual reasoning assistant."


@pytest.fixture(scope="module")
def samples():
    # Every sample has a system prompt: Qwen3.5's template adds no default system turn, and VAS divides by it.
    return [{**s, "system": s["system"] or SYSTEM} for s in tiny_samples()]


@pytest.fixture(scope="module")
def two_families(samples):
    """Reports of two tiny models of different families, layer and head counts: Qwen2.5-VL (3 decoder layers,
    all softmax attention, 4 heads) and Qwen3.5 (4 decoder layers, softmax attention in 1 and 3, 8 heads)."""
    q25, p25 = build_tiny_qwen2_5_vl(seed=0)
    q35, p35 = qwen3_5.build(seed=0, num_heads=8, num_kv_heads=2, attn_implementation="eager")
    r25 = vas.measure(q25, p25, samples, progress=False, label="qwen2.5-vl")
    r35 = vas.measure(q35, p35, samples, batch_size=2, progress=False, label="qwen3.5")
    return (q35, p35), r25, r35


def test_qwen3_5_vas_per_attention_layer_equals_eager_maps(two_families, samples):
    """The Qwen3.5 report's per-layer VAS is that of its softmax layers, from eager output_attentions maps
    (which transformers gives for those layers only) and groups from the token ids."""
    (model, processor), _, report = two_families
    per_sample = []
    for s in samples:
        inputs = build_inputs(processor, [s])
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
        assert len(out.attentions) == 2
        groups = token_groups(inputs["input_ids"], processor, inputs["attention_mask"])
        masses = masses_from_maps([a.double() for a in out.attentions], groups.key_group)  # per layer [1, H, L, G]
        user = groups.user_mask[0]
        per_sample.append(torch.stack([(m[0, :, user, 1] / m[0, :, user, 2]).mean() for m in masses]))  # [NL]
    expect = torch.stack(per_sample).mean(0)  # equal-weight mean over samples
    assert report.per_layer["vas"] == pytest.approx(expect.tolist(), rel=1e-4)
    assert report.num_heads == 8 and report.decoder_layers == [1, 3]


def test_compare_two_families_by_relative_depth(two_families, tmp_path):
    _, r25, r35 = two_families
    assert (r25.num_layers, r25.num_heads, r25.num_decoder_layers) == (3, 4, 3)
    assert (r35.num_layers, r35.num_heads, r35.num_decoder_layers) == (2, 8, 4)
    assert (r25.model_type, r35.model_type) == ("qwen2_5_vl", "qwen3_5")
    for depth in vas.DEPTH_AXES:
        png, js = tmp_path / f"{depth}.png", tmp_path / f"{depth}.json"
        vas.compare([r25, r35], str(png), depth=depth, json_path=str(js))
        assert os.path.getsize(png) > 1000
        rows = {r["label"]: r for r in json.loads(js.read_text())["reports"]}
        assert rows["qwen3.5"]["decoder_layers"] == [1, 3] and rows["qwen3.5"]["layers"] == [0, 1]
        assert rows["qwen3.5"]["depth"] == pytest.approx([0.5, 1.0])
        assert rows["qwen3.5"]["vas_per_layer"] == r35.per_layer["vas"]
        assert rows["qwen2.5-vl"]["decoder_layers"] == [0, 1, 2]
        assert rows["qwen2.5-vl"]["depth"] == pytest.approx([1 / 3, 2 / 3, 1.0])
        assert rows["qwen2.5-vl"]["model_type"] == "qwen2_5_vl"


def test_cli_vas_compare_overlays_a_report_of_another_family(two_families, samples, tmp_path):
    """`avar vas` on the tiny Qwen2.5-VL with `--compare` a saved Qwen3.5 report: compare.json and compare.png
    hold both curves with their layers, on the requested depth axis."""
    _, _, r35 = two_families
    saved = tmp_path / "qwen35"
    r35.save(str(saved))
    data = write_jsonl(tmp_path, samples)
    for depth in ("attention", "decoder"):
        out = tmp_path / f"out_{depth}"
        argv = ["vas", "--data", str(data), "--limit", "2", "--out", str(out), "--no-progress"]
        argv += ["--compare", str(saved), "--compare-depth", depth]
        assert main(argv) == 0
        assert os.path.getsize(out / "compare.png") > 1000
        got = json.loads((out / "compare.json").read_text())
        assert got["depth_axis"] == depth
        tiny, other = got["reports"]
        assert tiny["label"] == "tiny" and tiny["layers"] == [0, 1, 2] and tiny["num_heads"] == 4
        assert other["label"] == "qwen3.5" and other["decoder_layers"] == [1, 3] and other["num_heads"] == 8
        assert other["num_decoder_layers"] == 4 and "decoder layers 1, 3 of 4" in other["layers_text"]


def test_cli_vas_compare_measures_a_checkpoint_of_another_family(two_families, samples, tmp_path, capsys):
    """`--compare` a saved Qwen3.5 checkpoint: the CLI reads its shape (2 softmax-attention layers) from
    config.json, loads it with its family's class, measures it on the same data and overlays it; `--vas-layers
    -1` is the last attention layer of each model (decoder layer 2 of the Qwen2.5-VL, 3 of the Qwen3.5)."""
    (model, processor), _, r35 = two_families
    ckpt = tmp_path / "q35ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    data = write_jsonl(tmp_path, samples)
    out = tmp_path / "out"
    argv = ["vas", "--data", str(data), "--out", str(out), "--no-progress", "--compare", str(ckpt)]
    assert main(argv + ["--vas-layers", "-1", "--compare-depth", "decoder"]) == 0
    tiny, other = json.loads((out / "compare.json").read_text())["reports"]
    assert tiny["layers"] == [2] and tiny["decoder_layers"] == [2] and tiny["depth"] == pytest.approx([1.0])
    assert other["model_type"] == "qwen3_5" and other["layers"] == [1] and other["decoder_layers"] == [3]
    assert other["depth"] == pytest.approx([1.0]) and other["num_heads"] == 8
    measured = vas.VASReport.load(str(out / "compare" / "q35ckpt"))
    # The same weights and samples as the API's report (the reloaded processor may use the torchvision image
    # backend, whose pixel values differ from the PIL one's in float32 rounding).
    assert measured.per_layer["vas"] == pytest.approx(r35.per_layer["vas"][-1:], rel=1e-3)
    # A layer index past the Qwen3.5's two softmax layers (the Qwen2.5-VL has three) is refused in one line.
    capsys.readouterr()
    assert main(argv + ["--vas-layers", "2", "--overwrite"]) != 0
    err = capsys.readouterr().err
    assert "--vas-layers" in err and "2 layers" in err and len(err.strip().splitlines()) == 1
