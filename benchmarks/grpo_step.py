"""One GRPO step on a Qwen2.5-VL-7B-shaped slice: generation, scoring and update, three ways, in one run.

    avar    rollouts generated under the avar patch; one forward gives the completion log-probs and, through
            `collect_masses(reduce=VisualStats)`, r_visual per rollout ([B] sums per layer, no map); the policy
            loss back-propagates through that same forward (num_iterations = 1)
    eager   the published way: eager attention, the forward returns every layer's [B, H, L, L] map
            (`output_attentions=True`), r_visual is summed from the maps, the loss back-propagates through it
    sdpa    the floor: stock SDPA, no attention statistics (r_visual cannot be computed at all)

The slice: hidden 3584, 28 query heads, 4 key/value heads (head_dim 128), 2 decoder layers, random weights; MLP
width 2·hidden and a small vocabulary (the embedded tokenizer), so the attention share of the step is larger than
in the full model. Each prompt is a system prompt, one image (about half the tokens) and a question; a step
samples `--rollouts` completions of `--new-tokens` tokens.

Times are the median of `--repeat` steps after one warm-up step on a short prompt (which also creates the
optimizer state);
peak memory is the resident high-water mark of the timed step above what was resident before it
(/proc/self/clear_refs), so it counts activations, maps and gradients, not the weights and optimizer state.
Each method runs in its own process, so that all three start from the same allocator state.

    OMP_NUM_THREADS=2 python benchmarks/grpo_step.py --lengths 512 1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import sft_step
import torch

import harness

METHODS = ("avar", "eager", "sdpa")
PHASES = ("generation", "scoring", "update")
LABELS = {"avar": "avar (fused masses)", "eager": "eager maps", "sdpa": "SDPA, no reward"}


def build_slice(seed: int = 0):
    # 28·28 pixels per visual token after merging: up to (1344/28)² = 2304 image tokens.
    return sft_step.build_slice(seed=seed, max_pixels=1344 * 1344)


def make_prompt(processor, L: int, rollouts: int):
    """Left-padded prompt inputs of about L − new tokens: half image, the rest system prompt and question."""
    from PIL import Image

    side = max(56, int(round((L / 2) ** 0.5)) * 28)  # (side/28)² visual tokens ≈ L/2
    img = Image.new("RGB", (side, side), (200, 120, 40))
    words = "Look at the image and think about the shapes, colours and their relations. "
    tok = processor.tokenizer
    per = len(tok.encode(words))
    n_words = max(1, (L // 2 - 40) // (2 * per))
    messages = [
        {"role": "system", "content": [{"type": "text", "text": words * n_words}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words * n_words}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text] * rollouts, images=[[img]] * rollouts, return_tensors="pt", padding=True)
    return dict(inputs)


def _step(model, processor, prompt, method: str, new_tokens: int, optimizer, times: dict):
    """One GRPO step; adds each phase's seconds to `times`. Returns r_visual [N] (None for sdpa)."""
    from avar_ops.hf import collect_masses, get_handle, token_groups
    from avar_ops.method import visual_reward
    from avar_train.grpo.loss import group_advantages, policy_loss
    from avar_train.grpo.rewards import VisualStats, visual_terms
    from avar_train.grpo.trainer import completion_logps

    ids, att = prompt["input_ids"], prompt["attention_mask"]  # [N, P]
    N, P = ids.shape
    groups = token_groups(ids, processor, att)
    handle = get_handle(model)
    if handle is not None:
        handle.set_key_groups(groups.key_group)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**prompt, do_sample=True, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    times["generation"] += time.perf_counter() - t0
    comp = out[:, P:]  # [N, C]
    C = comp.shape[1]
    inputs = dict(prompt)
    inputs["input_ids"] = out  # [N, P + C]
    inputs["attention_mask"] = torch.cat([att, torch.ones_like(comp)], dim=1)  # [N, P + C]
    inputs["mm_token_type_ids"] = torch.nn.functional.pad(prompt["mm_token_type_ids"], (0, C))  # [N, P + C]
    response = torch.zeros(N, P + C, dtype=torch.bool)  # [N, P + C]
    response[:, P:] = True

    t1 = time.perf_counter()
    r_visual = None
    if method == "avar":
        stats = VisualStats(response)
        with collect_masses(model, reduce=stats) as rec:
            res = model(**inputs, use_cache=False, logits_to_keep=C + 1)
        r_visual = visual_terms(rec.masses, response).ratio  # [N]
    elif method == "eager":
        res = model(**inputs, use_cache=False, logits_to_keep=C + 1, output_attentions=True)
        kg = torch.nn.functional.pad(groups.key_group.long(), (0, C))  # [N, P + C]
        onehot = torch.nn.functional.one_hot(kg.clamp(min=0), 4).to(res.attentions[0].dtype)  # [N, L, 4]
        masses = [a.detach() @ onehot[:, None] for a in res.attentions]  # per layer [N, H, L, 4]
        r_visual = visual_reward(masses, response, eps=1e-6)  # [N]
    else:
        res = model(**inputs, use_cache=False, logits_to_keep=C + 1)
    logps = completion_logps(res.logits[:, :-1], comp, 1.0)  # [N, C]
    rewards = torch.arange(N, dtype=torch.float64) + (0.0 if r_visual is None else 0.3 * r_visual.double().cpu())
    adv = group_advantages(rewards, N)  # [N]
    times["scoring"] += time.perf_counter() - t1

    t2 = time.perf_counter()
    loss = policy_loss(logps, logps.detach(), adv.float(), torch.ones(N, C, dtype=torch.bool)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times["update"] += time.perf_counter() - t2
    if handle is not None:
        handle.set_key_groups(None)
    del res, logps, loss
    return r_visual


def run(lengths, rollouts: int, new_tokens: int, repeat: int, methods=METHODS) -> list:
    from avar_ops.hf import apply_to_qwen2_5_vl

    model, processor = build_slice()
    model.train()
    model.model.visual.requires_grad_(False)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    text_config = model.model.language_model.config
    prompts = {L: make_prompt(processor, L - new_tokens, rollouts) for L in lengths}
    warm = make_prompt(processor, 128, rollouts)
    rows = {
        L: {
            "L": int(prompts[L]["input_ids"].shape[1]) + new_tokens,
            "rollouts": rollouts,
            "new_tokens": new_tokens,
            "seconds": {},
            "peak_mb": {},
            "r_visual": {},
        }
        for L in lengths
    }
    for method in methods:
        model.load_state_dict(initial)
        handle = None
        if method == "avar":
            handle = apply_to_qwen2_5_vl(model, tokenizer=processor)
        else:
            text_config._attn_implementation = method
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        # Warm-up on a short prompt: creates the optimizer state and runs every code path once.
        torch.manual_seed(0)
        _step(model, processor, warm, method, 2, optimizer, {p: 0.0 for p in PHASES})
        for L in lengths:
            row = rows[L]
            per_phase = {p: [] for p in PHASES}
            peak = 0.0
            for _ in range(repeat):
                torch.manual_seed(1)
                model.load_state_dict(initial)
                times = {p: 0.0 for p in PHASES}
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                base = harness.process_status_mb("VmRSS:")
                r_visual = _step(model, processor, prompts[L], method, new_tokens, optimizer, times)
                peak = max(peak, harness.process_status_mb("VmHWM:") - base)
                for p in PHASES:
                    per_phase[p].append(times[p])
            row["seconds"][method] = {p: statistics.median(v) for p, v in per_phase.items()}
            row["seconds"][method]["total"] = sum(row["seconds"][method][p] for p in PHASES)
            row["peak_mb"][method] = peak
            row["r_visual"][method] = None if r_visual is None else [float(x) for x in r_visual]
            s = row["seconds"][method]
            print(
                f"L={row['L']} {method:6s} "
                + " ".join(f"{p} {s[p]:.2f}s" for p in PHASES + ("total",))
                + f" peak +{peak:.0f} MB",
                flush=True,
            )
        if handle is not None:
            handle.revert()
        text_config._attn_implementation = "sdpa"
        del optimizer
    return [rows[L] for L in lengths]


def markdown(rows, env: dict) -> str:
    lines = [
        "# GRPO step on a Qwen2.5-VL-7B-shaped slice (CPU)",
        "",
        *harness.environment_lines(env),
        "",
        "The machine's cores may be shared: absolute seconds move with the load, ratios within one run less so.",
        "",
    ]
    return "\n".join(lines + table(rows)) + "\n"


def table(rows) -> list:
    """The results as Markdown lines: per length and method, the phases, the ratios and r_visual."""
    lines = [
        "hidden 3584, 28 heads, 4 kv heads, 2 layers, random weights, float32. Seconds per phase (median), peak "
        "resident memory added by the step. Ratios are against the SDPA step without reward, measured in the "
        "same run.",
        "",
        "| L | rollouts × new tokens | method | generation s | scoring s | update s | total s | total vs SDPA | "
        "peak MB | peak vs SDPA |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base_t = r["seconds"].get("sdpa", {}).get("total")
        base_m = r["peak_mb"].get("sdpa")
        for m, s in r["seconds"].items():
            ratio_t = f"{s['total'] / base_t:.2f}×" if base_t else "–"
            ratio_m = f"{r['peak_mb'][m] / base_m:.2f}×" if base_m else "–"
            lines.append(
                f"| {r['L']} | {r['rollouts']} × {r['new_tokens']} | {LABELS[m]} | {s['generation']:.2f} | "
                f"{s['scoring']:.2f} | {s['update']:.2f} | {s['total']:.2f} | {ratio_t} | "
                f"{r['peak_mb'][m]:.0f} | {ratio_m} |"
            )
    lines += ["", "r_visual of the rollouts, avar vs eager maps (same weights, same samples):", ""]
    for r in rows:
        if r["r_visual"].get("avar") and r["r_visual"].get("eager"):
            a, e = r["r_visual"]["avar"], r["r_visual"]["eager"]
            lines.append(f"- L={r['L']}: avar {[round(x, 5) for x in a]}, eager {[round(x, 5) for x in e]}")
    return lines


def _run_isolated(method: str, lengths, rollouts: int, new_tokens: int, repeat: int) -> list:
    """One method in a fresh interpreter, so that its peak memory is measured from the same starting point as
    the others' (freed memory that the allocator keeps would otherwise favour whichever method runs later)."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--method",
            method,
            "--rows-out",
            out,
            "--lengths",
            *map(str, lengths),
            "--rollouts",
            str(rollouts),
            "--new-tokens",
            str(new_tokens),
            "--repeat",
            str(repeat),
        ]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def run_all(lengths, rollouts: int, new_tokens: int, repeat: int, methods=METHODS) -> list:
    """Every method, each in its own process; rows per length with all methods' numbers."""
    rows = None
    for method in methods:
        part = _run_isolated(method, lengths, rollouts, new_tokens, repeat)
        if rows is None:
            rows = part
        else:
            for row, other in zip(rows, part):
                for key in ("seconds", "peak_mb", "r_visual"):
                    row[key].update(other[key])
    return rows


def main(argv=None) -> None:
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--rollouts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--quick", action="store_true", help="small sizes, no report: checks that everything runs")
    ap.add_argument("--name", default="cpu_grpo_step")
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # one method, in this process
    ap.add_argument("--rows-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.new_tokens = [192], 4
    if args.method:
        rows = run(args.lengths, args.rollouts, args.new_tokens, args.repeat, methods=(args.method,))
        with open(args.rows_out, "w") as f:
            json.dump(rows, f)
        return
    env = harness.environment(argv)
    rows = run_all(args.lengths, args.rollouts, args.new_tokens, args.repeat, tuple(args.methods))
    harness.finish(env)
    md = markdown(rows, env)
    print(md)
    if not args.quick:
        harness.write_report(harness.RESULTS, args.name, {"environment": env, "results": rows}, md)


if __name__ == "__main__":
    main()
