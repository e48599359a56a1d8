"""Learned attention steering against the paper's two extremes, in one run.

Part 1, the tiny Qwen2.5-VL (examples/shapes, the same records and steps for every trained setting): held-out
L_LM (token mean over the response), the user tokens' image mass and VAS (over all layers and heads), and the
trainable parameter count, for

    none         plain attention, the model as built
    alpha_0.15   the training-free intervention, α_img = 0.15 (mode weights: β_img = log 1.15 in every head)
    steer        `avar-train steer` for --steps steps: only the bias / logit-scale tables train
    sft          `avar-train sft` (AGTO) for --steps steps: the text decoder trains

All four are measured by one function on the held-out records (each record a batch of one), on a fresh copy of
the model with the setting applied; the trained ones use the same records, batch size, seed and AGTO weights.

Part 2, the Qwen2.5-VL-7B-shaped slice of benchmarks/sft_step.py (2 decoder layers of hidden 3584, 28 heads):
one training step of steering (tables only) against one AGTO SFT step (text decoder and AdamW), and a forward
without gradients (inference) as the floor, each in a fresh process: median wall and process CPU seconds, the
step's peak resident memory above what was resident before it, and the whole process's peak (weights, gradients
and optimizer state included), which is where steering saves.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/steer_compare.py --steps 20 --slice-length 384 --repeat 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(ROOT, "examples", "shapes")
SETTINGS = ("none", "alpha_0.15", "steer", "sft")
SLICE_METHODS = ("forward", "steer", "sft")
SLICE_LABELS = {"forward": "forward, no grad", "steer": "steering step", "sft": "AGTO SFT step"}
ALPHA = BETA = 0.15


# ------------------------------------------------------------------------------------------------ part 1: tiny


def evaluate(model, processor, records) -> dict:
    """Held-out L_LM, image mass and VAS of the patched `model` as it stands (tables included), one record at a
    time, averaged over records."""
    from avar_ops.hf import collect_masses
    from avar_ops.method import vas
    from avar_train.data.collator import QwenVLCollator

    collator = QwenVLCollator(processor, max_length=512, min_pixels=3136, max_pixels=12544, mode="sft")
    lm, mass, score, sums = [], [], [], []
    model.eval()
    with torch.no_grad():
        for record in records:
            batch = collator([record])
            with collect_masses(model) as rec:
                out = model(**QwenVLCollator.model_inputs(batch), use_cache=False)
            res = vas(rec.masses, batch["user_mask"])
            lm.append(float(out.loss))
            mass.append(float(res.image_mass.overall))
            score.append(float(res.vas.overall))
            sums.append(float(res.ratio_of_sums.overall))
    return {
        "loss_lm": statistics.fmean(lm),
        "image_mass": statistics.fmean(mass),
        "vas": statistics.fmean(score),
        "vas_ratio_of_sums": statistics.fmean(sums),
        "records": len(records),
    }


def _train(command: str, steps: int, folder: str, seed: int):
    from avar_ops.data import load_records
    from avar_train.config import load_config
    from avar_train.sft.config import SFTConfig
    from avar_train.sft.trainer import train_sft
    from avar_train.steer.config import SteerConfig
    from avar_train.steer.trainer import train_steer

    recipe = os.path.join(ROOT, "training", "configs", f"{command}_tiny.yaml")
    overrides = {
        "train_file": os.path.join(SHAPES, "train.jsonl"),
        "output_dir": folder,
        "max_steps": steps,
        "seed": seed,
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "alpha": ALPHA,
        "beta": BETA,
        "report_to": [],
    }
    cfg = load_config(SteerConfig if command == "steer" else SFTConfig, recipe, overrides)
    records = load_records(cfg.train_file, use="sft").records
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = (train_steer if command == "steer" else train_sft)(cfg, records=records)
    took = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if command == "steer":
        trainable = trainer.tables.num_trainable()
    return cfg, trainer, trainable, took


def compare_tiny(steps: int, seed: int) -> dict:
    from avar_ops.analysis import build_tiny_qwen2_5_vl
    from avar_ops.data import load_records
    from avar_ops.hf import apply_to_qwen2_5_vl
    from avar_ops.method import Intervention, patch_tables

    held_out = load_records(os.path.join(SHAPES, "eval.jsonl"), use="sft").records
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        trained = {name: _train(name, steps, os.path.join(tmp, name), seed) for name in ("steer", "sft")}
        for name in SETTINGS:
            model, processor = build_tiny_qwen2_5_vl(seed=seed)
            tables = {}
            if name == "alpha_0.15":
                tables = patch_tables(model, Intervention(mode="weights", alpha_img=0.15))
            if name == "sft":
                model.load_state_dict(trained["sft"][1].model.state_dict())
            handle = apply_to_qwen2_5_vl(model, tokenizer=processor, **tables)
            if name == "steer":
                handle.load_steering(os.path.join(tmp, "steer", "steering.safetensors"))
            row = {"setting": name, **evaluate(model, processor, held_out)}
            row["trainable_parameters"] = trained[name][2] if name in trained else 0
            if name in trained:
                row["train_seconds"] = trained[name][3]["seconds"]
                row["train_cpu_seconds"] = trained[name][3]["cpu_seconds"]
                row["learning_rate"] = trained[name][0].learning_rate
            handle.revert()
            rows[name] = row
            print(
                f"tiny {name:11s} L_LM {row['loss_lm']:.4f}  image mass {row['image_mass']:.4f}  VAS {row['vas']:.4g} "
                f"(ratio of sums {row['vas_ratio_of_sums']:.4g})  "
                f"trainable {row['trainable_parameters']}",
                flush=True,
            )
    return {
        "steps": steps,
        "seed": seed,
        "batch_size": 2,
        "train_records": 36,
        "held_out_records": len(held_out),
        "rows": [rows[s] for s in SETTINGS],
    }


# ----------------------------------------------------------------------------------------------- part 2: slice


def _slice_step(method: str, model, processor, batch: dict, workdir: str):
    """A callable running one step of `method` on the slice (see the module)."""
    from transformers import TrainingArguments

    from avar_ops.hf import apply_to_qwen2_5_vl
    from avar_train.data.collator import QwenVLCollator
    from avar_train.sft.trainer import AGTOSettings, AGTOTrainer
    from avar_train.steer.config import SteerConfig
    from avar_train.steer.trainer import SteeringTrainer, steering_tables_for

    apply_to_qwen2_5_vl(model, tokenizer=processor)
    if method == "forward":
        model.eval()
        inputs = QwenVLCollator.model_inputs(batch)

        def forward():
            with torch.no_grad():
                model(**inputs, use_cache=False)

        return forward
    model.train()
    args = TrainingArguments(output_dir=workdir, report_to="none", remove_unused_columns=False, disable_tqdm=True)
    agto = AGTOSettings(alpha=ALPHA, beta=BETA)
    if method == "steer":
        for p in model.parameters():
            p.requires_grad_(False)
        tables = steering_tables_for(model, SteerConfig())
        model.add_module("avar_steering", tables)
        trainer = SteeringTrainer(model=model, args=args, agto=agto, tables=tables)
        params = list(tables.parameters())
    else:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
        trainer = AGTOTrainer(model=model, args=args, agto=agto)
        params = [p for p in model.parameters() if p.requires_grad]
    trainer.current_gradient_accumulation_steps = 1
    optimizer = torch.optim.AdamW(params, lr=1e-6)

    def step():
        trainer.training_step(model, dict(batch))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_slice(method: str, L: int, repeat: int) -> dict:
    """Seconds (median), the step's peak MB above what was resident before it, and the process's peak MB."""
    import sft_step

    with tempfile.TemporaryDirectory() as workdir:
        model, processor = sft_step.build_slice("sdpa")
        batch = sft_step.make_batch(processor, L, workdir)
        step = _slice_step(method, model, processor, batch, workdir)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        step()  # warm-up: optimizer state, allocator
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        resident = harness.process_status_mb("VmRSS:")  # weights (+ optimizer state) after the warm-up
        open("/proc/self/clear_refs", "w").write("5")
        base = harness.process_status_mb("VmRSS:")
        times, cpu = [], []
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return {
            "tokens": int(batch["input_ids"].shape[1]),
            "seconds": statistics.median(times),
            "cpu_seconds": statistics.median(cpu),
            "step_peak_mb": harness.process_status_mb("VmHWM:") - base,
            "resident_mb": resident,
            "process_peak_mb": harness.process_status_mb("VmHWM:"),
            "trainable_parameters": trainable,
        }


def compare_slice(L: int, repeat: int) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    out = {}
    for method in SLICE_METHODS:
        prog = (
            f"import json, sys; sys.path.insert(0, {here!r}); import steer_compare; "
            f"print(json.dumps(steer_compare.measure_slice({method!r}, {L}, {repeat})))"
        )
        res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=1800)
        if res.returncode != 0:
            raise RuntimeError(f"slice {method} L={L} failed:\n{res.stderr[-3000:]}")
        out[method] = json.loads(res.stdout.strip().splitlines()[-1])
        got = out[method]
        print(
            f"slice L={got['tokens']} {method}: {got['seconds']:.2f} s wall, {got['cpu_seconds']:.2f} s CPU, "
            f"step peak {got['step_peak_mb']:.0f} MB, process peak {got['process_peak_mb']:.0f} MB",
            flush=True,
        )
    sft, steer = out["sft"], out["steer"]
    ratios = {
        "steer_vs_sft_seconds": steer["seconds"] / sft["seconds"],
        "steer_vs_sft_cpu_seconds": steer["cpu_seconds"] / sft["cpu_seconds"],
        "steer_vs_sft_step_peak": steer["step_peak_mb"] / sft["step_peak_mb"],
        "steer_vs_sft_process_peak": steer["process_peak_mb"] / sft["process_peak_mb"],
        "steer_vs_forward_process_peak": steer["process_peak_mb"] / out["forward"]["process_peak_mb"],
    }
    return {"L": L, "repeat": repeat, "methods": out, "ratios": ratios}


# ----------------------------------------------------------------------------------------------------- report


def markdown(env: dict, tiny: dict, sl: dict) -> str:
    lines = ["# Learned steering against the training-free intervention and AGTO SFT", ""]
    lines += harness.environment_lines(env) + [""]
    lines += [
        f"## Tiny Qwen2.5-VL: held-out records after {tiny['steps']} steps (examples/shapes, "
        f"{tiny['train_records']} training records, batch {tiny['batch_size']}, seed {tiny['seed']})",
        "",
    ]
    rows = []
    for r in tiny["rows"]:
        rows.append(
            [
                r["setting"],
                f"{r['loss_lm']:.4f}",
                f"{r['image_mass']:.4f}",
                f"{r['vas']:.4g}",
                f"{r['vas_ratio_of_sums']:.4g}",
                r["trainable_parameters"],
                harness.fmt(r.get("learning_rate"), "g"),
                harness.fmt(r.get("train_cpu_seconds"), ".1f"),
            ]
        )
    lines += harness.markdown_table(
        [
            "setting",
            "held-out L_LM",
            "image mass",
            "VAS (mean of ratios)",
            "VAS (ratio of sums)",
            "trainable parameters",
            "learning rate",
            "train CPU s",
        ],
        rows,
    )
    lines += [
        "",
        "VAS is the paper's mean over layers, heads and user tokens of image mass / system mass: once training "
        "pushes some tokens' system mass toward 0 their ratios dominate it, so the ratio of sums (Σ image mass / "
        "Σ system mass over the same terms) and the image mass say more about the shift. The trained settings "
        "share the records, batch, seed, steps and AGTO weights (α = β = 0.15); each has its own learning rate "
        "(the recipes' defaults for the tiny model), so the table compares the two recipes as shipped, not a tuned "
        "optimum of either.",
    ]
    m = sl["methods"]
    lines += [
        "",
        f"## Qwen2.5-VL-7B-shaped slice: one step at {m['sft']['tokens']} tokens (median of {sl['repeat']})",
        "",
    ]
    rows = [
        [
            SLICE_LABELS[k],
            f"{m[k]['seconds']:.2f}",
            f"{m[k]['cpu_seconds']:.2f}",
            f"{m[k]['step_peak_mb']:.0f}",
            f"{m[k]['resident_mb']:.0f}",
            f"{m[k]['process_peak_mb']:.0f}",
            m[k]["trainable_parameters"] if k != "forward" else 0,
        ]
        for k in SLICE_METHODS
    ]
    lines += harness.markdown_table(
        ["step", "wall s", "CPU s", "step peak MB", "resident after warm-up MB", "process peak MB", "trainable"], rows
    )
    rows = []
    for label, key in (
        ("wall s", "seconds"),
        ("CPU s", "cpu_seconds"),
        ("step peak MB", "step_peak_mb"),
        ("process peak MB", "process_peak_mb"),
    ):
        steer = m["steer"][key]
        rows.append([label, f"{steer / m['sft'][key]:.3f}×", f"{steer / m['forward'][key]:.3f}×"])
    lines += ["", "Ratios of the steering step (same run)", ""]
    lines += harness.markdown_table(["measure", "steering / AGTO SFT", "steering / forward"], rows)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="training steps of steer and sft on the tiny model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slice-length", type=int, default=384, help="tokens of the slice's sample")
    ap.add_argument("--repeat", type=int, default=2, help="timed slice steps per method (after one warm-up)")
    ap.add_argument("--name", default="cpu_steer_compare")
    ap.add_argument("--out", default=harness.RESULTS)
    args = ap.parse_args(argv)
    env = harness.environment(argv)
    tiny = compare_tiny(args.steps, args.seed)
    sl = compare_slice(args.slice_length, args.repeat)
    harness.finish(env)
    payload = {"environment": env, "tiny": tiny, "slice": sl}
    paths = harness.write_report(args.out, args.name, payload, markdown(env, tiny, sl))
    print("\n".join(paths))


if __name__ == "__main__":
    main()
