"""Pass rates over seeds of the training convergence checks, as they were and as they are now.

For each seed the same runs are judged by the old criterion (the test as it stood, which ran seed 0 only)
and by the new per-seed criterion; the new tests take CONVERGENCE_SEEDS (five seeds) at once, so their verdict
is also reported on disjoint windows of five seeds. Writes benchmarks/results/seed_pass_rates.{json,md}.

    python scripts/seed_pass_rates.py --seeds 20 --which patch sft grpo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


# ------------------------------------------------------------------------------------ through the patch


def patch_seed(seed, folder):
    import test_train_through_patch as t

    agto, lm = t.agto_against_lm_only(seed)
    n = t.convergence_numbers(agto, lm)
    start, end, base = agto[0], agto[-1], lm[-1]
    old = (
        all(b["image_mass"] > a["image_mass"] and b["vas"] > a["vas"] for a, b in zip(agto, agto[1:]))
        and end["enhance"] < start["enhance"]
        and end["suppress"] < start["suppress"]
        and end["image_mass"] > base["image_mass"]
        and end["vas"] > base["vas"]
        and n["image_gain"] > 2 * abs(n["lm_only_image_gain"])
        and end["lm"] < start["lm"]
    )
    new = (
        n["enhance_drop"] > 0
        and n["suppress_drop"] > 0
        and n["image_gain"] > 0
        and n["vas_gain"] > 0
        and end["image_mass"] > base["image_mass"]
        and end["vas"] > base["vas"]
        and n["lm_drop"] > 0
    )
    return old, new, {"image_gain": n["image_gain"], "lm_only_image_gain": n["lm_only_image_gain"]}


def patch_window(per_seed):
    gains = sorted(p["numbers"]["image_gain"] for p in per_seed)
    lm = sorted(abs(p["numbers"]["lm_only_image_gain"]) for p in per_seed)
    return all(p["new"] for p in per_seed) and gains[len(gains) // 2] > 2 * lm[len(lm) // 2]


# ------------------------------------------------------------------------------------------------- SFT


def sft_seed(seed, folder):
    import test_train_sft as t

    agto, lm = t.agto_and_lm_only_runs(seed, folder)
    img_gain = agto[-1]["image_mass"] - agto[0]["image_mass"]
    lm_gain = lm[-1]["image_mass"] - lm[0]["image_mass"]
    trains = (
        agto[-1]["loss_lm"] < agto[0]["loss_lm"]
        and lm[-1]["loss_lm"] < lm[0]["loss_lm"]
        and agto[-1]["loss_enhance_img"] < agto[0]["loss_enhance_img"]
        and agto[-1]["loss_suppress_sys"] < agto[0]["loss_suppress_sys"]
    )
    old = (
        trains
        and img_gain > 0
        and agto[-1]["vas"] > agto[0]["vas"]
        and agto[-1]["vas"] > lm[-1]["vas"]
        and img_gain > 2 * abs(lm_gain)
    )
    new = (
        agto[-1]["loss_lm"] < agto[0]["loss_lm"]
        and lm[-1]["loss_lm"] < lm[0]["loss_lm"]
        and agto[-1]["loss_enhance_img"] < lm[-1]["loss_enhance_img"]
        and agto[-1]["loss_suppress_sys"] < lm[-1]["loss_suppress_sys"]
        and agto[-1]["image_mass"] > lm[-1]["image_mass"]
        and agto[-1]["vas"] > lm[-1]["vas"]
    )
    numbers = {
        "image_gain": img_gain,
        "lm_only_image_gain": lm_gain,
        "image_over_lm_only": agto[-1]["image_mass"] - lm[-1]["image_mass"],
    }
    return old, new, numbers


def sft_window(per_seed):
    return all(p["new"] for p in per_seed)


# ------------------------------------------------------------------------------------------------ GRPO


def grpo_seed(seed, folder):
    import test_train_grpo_wiring as w
    from grpo_fixtures import initial_checker, write_colour_task

    from avar_ops.analysis import build_tiny_qwen2_5_vl
    from avar_train.grpo.config import load_grpo_config
    from avar_train.grpo.rewards import accuracy_reward
    from avar_train.grpo.trainer import GRPOTrainer

    data = write_colour_task(os.path.join(folder, "data"), n=6)

    def run(lam):  # the old test's runs, at this seed
        cfg = load_grpo_config(
            None,
            dict(
                model_name_or_path="tiny",
                train_file=data,
                output_dir=os.path.join(folder, f"lam{lam}"),
                max_steps=8,
                per_device_train_batch_size=8,
                num_generations=4,
                max_completion_length=6,
                learning_rate=1e-2,
                lambda_visual=lam,
                lambda_format=0.0,
                seed=seed,
            ),
        )
        model, processor = build_tiny_qwen2_5_vl(seed=seed)
        return GRPOTrainer(cfg, model, processor, accuracy=accuracy_reward(initial_checker)).train()

    plain, visual = run(0.0), run(0.3)

    def late(history, key):
        return sum(r[key] for r in history[-3:]) / 3

    ratio = late(visual, "response_image_mass") / late(plain, "response_image_mass")
    old = ratio > 1.3 and late(visual, "r_visual_raw") > 1.3 * late(plain, "r_visual_raw")
    wiring_data = write_colour_task(os.path.join(folder, "wiring"), n=4, seed=0)
    gain, _, _ = w.visual_update_gain(wiring_data, os.path.join(folder, "update"), seed)
    return old, gain > 0, {"old_image_mass_ratio": ratio, "update_gain": gain}


def grpo_window(per_seed):
    return all(p["new"] for p in per_seed)


CHECKS = {
    "patch": ("tests/test_train_through_patch.py::test_agto_steps_raise_image_attention", patch_seed, patch_window),
    "sft": ("tests/test_train_sft.py::test_agto_raises_image_attention_against_lm_only", sft_seed, sft_window),
    "grpo": (
        "tests/test_train_grpo.py::test_visual_reward_raises_image_mass (old) / "
        "tests/test_train_grpo_wiring.py::test_visual_reward_update_favours_high_r_visual_rollouts (new)",
        grpo_seed,
        grpo_window,
    ),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="seeds 0 .. N-1 (default 20)")
    parser.add_argument("--which", nargs="+", choices=sorted(CHECKS), default=sorted(CHECKS))
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "seed_pass_rates"))
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.render:
        with open(args.out + ".json", encoding="utf-8") as f:
            write(json.load(f), args.out)
        return 0
    import torch

    torch.set_num_threads(1)
    report = {
        "command": "python scripts/seed_pass_rates.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": list(os.getloadavg()),
        "checks": {},
    }
    if os.path.exists(args.out + ".json"):
        with open(args.out + ".json", encoding="utf-8") as f:
            report["checks"] = json.load(f).get("checks", {})
    for name in args.which:
        test, per_seed_fn, window_fn = CHECKS[name]
        rows = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix=f"avar-seed-{name}-") as folder:
                old, new, numbers = per_seed_fn(seed, folder)
            rows.append({"seed": seed, "old": bool(old), "new": bool(new), "numbers": numbers})
            print(f"{name} seed {seed}: old {old} new {new} {numbers} ({time.perf_counter() - t0:.0f} s)", flush=True)
        windows = [rows[i : i + 5] for i in range(0, len(rows) - 4, 5)]
        report["checks"][name] = {
            "test": test,
            "command": report["command"],
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_average": list(os.getloadavg()),
            "seeds": args.seeds,
            "old_passes": sum(r["old"] for r in rows),
            "new_seed_passes": sum(r["new"] for r in rows),
            "new_test_windows_passed": [bool(window_fn(w)) for w in windows],
            "rows": rows,
        }
        write(report, args.out)
    return 0


def write(report, out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    lines = [
        "# Convergence checks: pass rates over seeds",
        "",
        "Old: the test as it stood (seed 0 only), judged at each seed. New: the test's per-seed criterion; the new",
        "tests take five seeds at once, so their verdict is also given on disjoint windows of five seeds.",
        "",
        "| check | seeds | old test passes | new per-seed criterion holds | new test on windows of 5 seeds |",
        "|---|---|---|---|---|",
    ]
    for name, c in report["checks"].items():
        windows = c["new_test_windows_passed"]
        lines.append(
            f"| {name}: {c['test']} | {c['seeds']} | {c['old_passes']} | {c['new_seed_passes']} | "
            f"{sum(windows)} of {len(windows)} |"
        )
    lines.append("")
    for name, c in report["checks"].items():
        load = ", ".join(f"{x:.1f}" for x in c.get("load_average", [])) or "not recorded"
        lines.append(f"- {name}: `{c.get('command', '?')}`, {c.get('date_utc', '?')}, load average {load}")
    for name, c in report["checks"].items():
        keys = sorted(c["rows"][0]["numbers"]) if c["rows"] else []
        lines += [
            "",
            f"## {name}",
            "",
            "| seed | old | new | " + " | ".join(keys) + " |",
            "|---" * (3 + len(keys)) + "|",
        ]
        for r in c["rows"]:
            vals = " | ".join(f"{r['numbers'][k]:.4g}" for k in keys)
            lines.append(f"| {r['seed']} | {r['old']} | {r['new']} | {vals} |")
        if c["rows"]:
            for k in keys:
                lines.append(f"\nmedian {k}: {statistics.median(r['numbers'][k] for r in c['rows']):.4g}")
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
