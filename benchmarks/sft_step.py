"""One SFT training step on a Qwen2.5-VL-7B-shaped slice, three ways, in one run.

    avar    the product: `AGTOTrainer.training_step` on a patched model (fused attention with per-group masses,
            reduced per sample inside the forward) for L_LM + α·L_enhance_img + β·L_suppress_sys, then the
            optimizer step
    eager   the published way: eager attention returning every layer's [B, H, L, L] map
            (`output_attentions=True`), masses summed from the maps, the same AGTO losses, backward, step
    sdpa    the floor: stock SDPA and L_LM only (no attention loss can be computed)

The slice: hidden 3584, 28 query heads, 4 key/value heads (head_dim 128), 2 decoder layers, random weights; MLP
width 2·hidden and the embedded tokenizer's small vocabulary, so attention is a larger share of the step than in
the full model. Each sample is a system prompt, one image (about half the tokens), a question and a response,
collated by `avar_train.data.collator.QwenVLCollator`; AdamW over the text decoder (vision tower frozen), fp32.

Each method runs in a fresh process. Times are the median of `--repeat` steps after one warm-up step (which also
creates the optimizer state), as wall seconds and as the process's CPU seconds (user + system): on a shared
machine the wall time also counts waiting for cores other jobs hold, the CPU time does not. Peak memory is the
resident high-water mark of the timed steps above what was resident before them (/proc/self/clear_refs, after
`malloc_trim` returned the warm-up's freed memory): activations, maps and gradients, not weights and optimizer
state.
"""

from __future__ import annotations

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

METHODS = ("avar", "eager", "sdpa")
LABELS = {"avar": "avar AGTO step", "eager": "eager maps AGTO step", "sdpa": "SDPA, L_LM only"}
ALPHA = BETA = 0.15


def build_slice(attn_implementation: str = "sdpa", seed: int = 0, max_pixels: int = 2048 * 2048):
    """The Qwen2.5-VL-7B-shaped slice both training-step benchmarks measure (2 decoder layers, random weights)."""
    from avar_ops.analysis import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(
        seed=seed,
        num_layers=2,
        hidden_size=3584,
        num_heads=28,
        num_kv_heads=4,
        init_std=0.02,
        attn_implementation=attn_implementation,
        min_pixels=28 * 28 * 16,
        max_pixels=max_pixels,
    )


def make_batch(processor, L: int, folder: str) -> dict:
    """One collated SFT sample of about L tokens: a quarter system prompt and question, half image, the rest
    response."""
    from PIL import Image

    from avar_ops.data import parse_record
    from avar_train.data.collator import QwenVLCollator

    side = max(56, int(round((L / 2) ** 0.5)) * 28)  # (side / 28)² visual tokens ≈ L / 2
    Image.new("RGB", (side, side), (200, 120, 40)).save(os.path.join(folder, "img.png"))
    words = "Look at the image and think about the shapes, colours and their relations. "
    per = len(processor.tokenizer.encode(words))
    quarter = max(1, (L // 4 - 20) // per)
    record = parse_record(
        {
            "id": "bench",
            "image": "img.png",
            "system": words * (quarter // 2 + 1),
            "question": words * (quarter // 2 + 1),
            "response": words * quarter,
        },
        folder,
    )
    collator = QwenVLCollator(processor, max_length=4 * L, min_pixels=28 * 28 * 16, max_pixels=side * side)
    return collator([record])


def _masses_from_maps(attentions, key_group):
    kg = key_group.long()  # [B, L]
    onehot = torch.nn.functional.one_hot(kg.clamp(min=0), 4).to(attentions[0].dtype) * (kg >= 0)[..., None]
    return [a @ onehot[:, None] for a in attentions]  # per layer [B, H, L, 4]


def _stepper(method: str, model, processor, batch: dict, workdir: str):
    """A callable running one full training step (forward, backward, optimizer step) of `method`."""
    from avar_ops.hf import apply_to_qwen2_5_vl
    from avar_ops.method import agto_losses
    from avar_train.data.collator import QwenVLCollator
    from avar_train.sft.trainer import AGTOSettings, AGTOTrainer

    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    if method == "avar":
        from transformers import TrainingArguments

        apply_to_qwen2_5_vl(model, tokenizer=processor)
        args = TrainingArguments(output_dir=workdir, report_to="none", remove_unused_columns=False, disable_tqdm=True)
        trainer = AGTOTrainer(model=model, args=args, agto=AGTOSettings(alpha=ALPHA, beta=BETA))
        trainer.current_gradient_accumulation_steps = 1

        def step():
            trainer.training_step(model, dict(batch))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    inputs = QwenVLCollator.model_inputs(batch)

    def step():
        if method == "eager":
            out = model(**inputs, use_cache=False, output_attentions=True)
            masses = _masses_from_maps(out.attentions, batch["key_group"])
            enhance, suppress = agto_losses(masses, batch["user_mask"], batch["image_mask"], batch["system_mask"])
            loss = out.loss + ALPHA * enhance + BETA * suppress
        else:
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(method: str, L: int, repeat: int) -> dict:
    """Seconds (median) and peak MB of one method's step at about L tokens, in this process."""
    with tempfile.TemporaryDirectory() as workdir:
        model, processor = build_slice({"avar": "sdpa", "eager": "eager", "sdpa": "sdpa"}[method])
        batch = make_batch(processor, L, workdir)
        step = _stepper(method, model, processor, batch, workdir)
        step()  # warm-up: optimizer state, allocator
        # Hand the warm-up's freed activations back to the system, or the timed step would reuse them unseen.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
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
            "peak_mb": harness.process_status_mb("VmHWM:") - base,
        }


def run(lengths, repeat: int, methods=METHODS, eager_limit_gb: float = 10.0) -> list:
    """One row per length: seconds and peak MB per method (each in a fresh process, so that one method's freed
    memory cannot hide the next one's peak), and the ratios of avar and eager to sdpa."""
    rows = []
    for L in lengths:
        row = {"L": L, "seconds": {}, "cpu_seconds": {}, "peak_mb": {}, "skipped": {}}
        for method in methods:
            # Eager keeps several [B, H, L, L] fp32 maps per layer alive for backward.
            need_gb = 2 * 6 * 28 * L * L * 4 / 2**30
            if method == "eager" and need_gb > eager_limit_gb:
                row["skipped"][method] = f"needs about {need_gb:.0f} GB of maps (> {eager_limit_gb:g} GB)"
                print(f"sft L={L} {method}: skipped, {row['skipped'][method]}", flush=True)
                continue
            prog = (
                f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                f"import sft_step; print(json.dumps(sft_step.measure({method!r}, {L}, {repeat})))"
            )
            res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=1800)
            if res.returncode != 0:
                raise RuntimeError(f"sft step {method} L={L} failed:\n{res.stderr[-3000:]}")
            got = json.loads(res.stdout.strip().splitlines()[-1])
            row["tokens"] = got["tokens"]
            row["seconds"][method], row["peak_mb"][method] = got["seconds"], got["peak_mb"]
            row["cpu_seconds"][method] = got["cpu_seconds"]
            print(
                f"sft L={got['tokens']} {method}: {got['seconds']:.2f} s wall, {got['cpu_seconds']:.2f} s CPU, "
                f"{got['peak_mb']:.0f} MB",
                flush=True,
            )
        floor = row["seconds"].get("sdpa")
        row["time_vs_sdpa"] = {m: s / floor for m, s in row["seconds"].items() if floor and m != "sdpa"}
        cpu_floor = row["cpu_seconds"].get("sdpa")
        row["cpu_time_vs_sdpa"] = {m: s / cpu_floor for m, s in row["cpu_seconds"].items() if cpu_floor and m != "sdpa"}
        mem = row["peak_mb"].get("sdpa")
        row["memory_vs_sdpa"] = {m: v / mem for m, v in row["peak_mb"].items() if mem and m != "sdpa"}
        rows.append(row)
    return rows


def markdown(rows, methods=METHODS) -> list:
    def cell(d, m, fmt):
        return fmt.format(d[m]) if m in d else "–"

    lines = ["## SFT step (forward, backward, optimizer step)", ""]
    tables = (("Step time: wall seconds (median) and process CPU seconds", "seconds", "cpu_seconds"),)
    for title, wall, cpu in tables:
        lines += [
            title,
            "",
            "| tokens | "
            + " | ".join(f"{LABELS[m]} wall s / CPU s" for m in methods)
            + " | avar / SDPA wall | avar / SDPA CPU | eager / SDPA wall | eager / SDPA CPU |",
            "|---:|" + "---:|" * (len(methods) + 4),
        ]
        for r in rows:
            lines.append(
                f"| {r.get('tokens', r['L'])} | "
                + " | ".join(f"{cell(r[wall], m, '{:.1f}')} / {cell(r[cpu], m, '{:.1f}')}" for m in methods)
                + f" | {cell(r['time_vs_sdpa'], 'avar', '{:.3f}×')} | {cell(r['cpu_time_vs_sdpa'], 'avar', '{:.3f}×')}"
                + f" | {cell(r['time_vs_sdpa'], 'eager', '{:.3f}×')}"
                + f" | {cell(r['cpu_time_vs_sdpa'], 'eager', '{:.3f}×')} |"
            )
    lines += [
        "",
        "Peak memory of the step (MB above what was resident before it)",
        "",
        "| tokens | " + " | ".join(LABELS[m] for m in methods) + " | avar / SDPA | eager / SDPA |",
        "|---:|" + "---:|" * (len(methods) + 2),
    ]
    for r in rows:
        lines.append(
            f"| {r.get('tokens', r['L'])} | "
            + " | ".join(cell(r["peak_mb"], m, "{:.0f}") for m in methods)
            + f" | {cell(r['memory_vs_sdpa'], 'avar', '{:.3f}×')} | {cell(r['memory_vs_sdpa'], 'eager', '{:.3f}×')} |"
        )
    skipped = [(r, m, why) for r in rows for m, why in r["skipped"].items()]
    if skipped:
        lines += [""] + [f"- L={r['L']} {LABELS[m]}: skipped, {why}" for r, m, why in skipped]
    return lines
