"""The avar demo: a tiny random Qwen2.5-VL (or another family's), offline and on CPU, measured and steered in
about half a minute.

    avar demo [--out DIR] [--family NAME]          or          python -m avar_ops.analysis.demo [DIR]

It builds the tiny model with its offline processor and a few synthetic images, patches the model, measures
VAS and the lazy-attention split, generates with and without the intervention (the paper's α_img = 0.15,
α_sys = 0.2 on attention weights) and prints what changed; figures go to DIR (default ./avar_demo_out).
The model is random, so its answers are gibberish: the point is what the intervention does to the attention
and that the generated tokens follow it.
"""

from __future__ import annotations

import os
import sys
import time

DEMO_QUESTIONS = [
    ("What colour is the square?", None),
    (
        "How many circles are there?",
        "You are a careful visual reasoning assistant. Look at the image before answering.",
    ),
    ("Describe the image.", None),
    ("Compare the two images and tell me which one has more shapes.", None),
]
DEMO_ALPHA_IMG, DEMO_ALPHA_SYS = 0.15, 0.2
DEMO_MAX_NEW_TOKENS = 12


def demo_samples(seed: int = 0) -> list:
    from avar_ops.analysis.tiny_qwen import synthetic_images

    images = synthetic_images(5, seed=seed)
    samples = []
    for i, (question, system) in enumerate(DEMO_QUESTIONS):
        imgs = images[3:5] if "two images" in question else [images[i]]
        samples.append({"id": f"demo{i}", "images": imgs, "question": question, "system": system})
    return samples


def run_demo(out_dir: str = "avar_demo_out", *, progress: bool = True, family: str = "qwen2_5_vl") -> dict:
    """Run the demo on the tiny model of `family`, print what changed, write figures to out_dir; returns the
    numbers it printed. Per-patch heatmaps are drawn for families whose processor reports image grids."""
    import torch

    from avar_ops.analysis import vas
    from avar_ops.analysis.generation import generate_answers
    from avar_ops.analysis.image_attention import image_attention, save_overlays
    from avar_ops.analysis.tiny_families import build_tiny
    from avar_ops.data import build_inputs
    from avar_ops.hf import attention_layer_indices, get_family
    from avar_ops.method import Intervention

    t0 = time.perf_counter()
    torch.manual_seed(0)
    title = get_family(family).title
    print(f"avar demo: building a tiny random {title} and its offline processor ...")
    model, processor = build_tiny(family, seed=0)
    samples = demo_samples()
    cfg = getattr(model.config, "text_config", None) or model.config
    attn = attention_layer_indices(model.config)
    print(
        f"  {cfg.num_hidden_layers} decoder layers ({len(attn)} with softmax attention), {cfg.num_attention_heads} "
        f"heads ({cfg.num_key_value_heads} kv heads), {len(samples)} synthetic samples"
    )

    iv = Intervention(mode="weights", alpha_img=DEMO_ALPHA_IMG, alpha_sys=DEMO_ALPHA_SYS)
    os.makedirs(out_dir, exist_ok=True)
    base = vas.measure(model, processor, samples, progress=progress, label="tiny")
    steered = vas.measure(
        model, processor, samples, progress=progress, label=f"tiny + {iv.describe()}", intervention=iv
    )
    base.save(os.path.join(out_dir, "baseline"))
    steered.save(os.path.join(out_dir, "intervention"))
    compare_png = vas.compare([base, steered], os.path.join(out_dir, "compare.png"))

    print("\nVAS (prefill, user-text queries; mean of visual/system mass ratios over layers, heads, tokens):")
    print(f"  {'':34s} {'baseline':>10s} {'intervention':>13s}")
    for name, a, b in (
        ("VAS", base.vas, steered.vas),
        ("ratio of sums", base.ratio_of_sums, steered.ratio_of_sums),
        ("image mass", base.image_mass, steered.image_mass),
    ):
        print(f"  {name:34s} {a:10.4f} {b:13.4f}")
    print("  user-token attention split (mean over layers):")
    for g in ("visual", "system", "user", "other"):
        print(f"    {g:32s} {base.split[g]:10.4f} {steered.split[g]:13.4f}  ({steered.split[g] - base.split[g]:+.4f})")

    plain = generate_answers(model, processor, samples, max_new_tokens=DEMO_MAX_NEW_TOKENS)
    boosted = generate_answers(model, processor, samples, intervention=iv, max_new_tokens=DEMO_MAX_NEW_TOKENS)
    print(f"\nGreedy answers (random weights, so not meaningful text), {iv.describe()}:")
    changed = 0
    for s, a, b in zip(samples, plain, boosted):
        diff = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
        if diff is None and len(a["tokens"]) != len(b["tokens"]):
            diff = min(len(a["tokens"]), len(b["tokens"]))
        changed += diff is not None
        status = "same tokens" if diff is None else f"differs from token {diff}"
        print(f"  {s['id']} {s['question']!r}: {status}")
        print(f"    baseline:     {a['answer']!r}")
        print(f"    intervention: {b['answer']!r}")

    overlays = []
    if "image_grid_thw" in build_inputs(processor, samples[:1]):  # per-patch maps need the image grids
        for label, intervention in (("baseline", None), ("intervention", iv)):
            res = image_attention(model, processor, samples[0], layers=[-1], intervention=intervention)
            overlays += save_overlays(res, samples[0], out_dir, prefix=f"attention_{label}")
    else:
        print(f"\nPer-patch heatmaps: skipped, the {title} processor reports no image grid (image_grid_thw).")
    elapsed = time.perf_counter() - t0
    print(f"\n{changed} of {len(samples)} answers changed. Figures in {os.path.abspath(out_dir)}:")
    for p in [
        os.path.join(out_dir, "baseline", "vas_heatmap.png"),
        os.path.join(out_dir, "baseline", "lazy_attention.png"),
        compare_png,
        *overlays,
    ]:
        print(f"  {p}")
    print(f"done in {elapsed:.1f} s")
    return {
        "baseline": base,
        "intervention": steered,
        "answers": {"baseline": plain, "intervention": boosted},
        "changed": changed,
        "figures": [compare_png, *overlays],
        "seconds": elapsed,
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: python -m avar_ops.analysis.demo [OUT_DIR]", file=sys.stderr)
        return 2
    run_demo(argv[0] if argv else "avar_demo_out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
