"""Planted mutations of the method, grading and training code, each run against the test files that should
catch it; writes the survivors to benchmarks/results/mutation_report.{json,md}.

Each mutant is one (file, original snippet, mutated snippet, test files) entry below: a small, realistic bug
(a flipped sign, a swapped mask, an off-by-one, a dropped gate). The tree is copied once into a temporary
folder (source files and the built extension, not .git or .venv); each mutant edits one file of the copy,
runs `python -m pytest -x -q <its test files>` there with the copy first on PYTHONPATH, and restores the
file. A mutant is killed when the run fails, survives when it passes, and is reported as "timeout" when the
run takes longer than --timeout seconds. Every original snippet must occur exactly once in its file, so a
list that has gone stale fails loudly instead of testing nothing.

    python scripts/mutation_check.py                 # every mutant (tens of minutes on 2 cores)
    python scripts/mutation_check.py --only 3 7      # some of them, by index
    python scripts/mutation_check.py --list          # the list, without running anything

It does not run in CI: each mutant reruns training tests on the tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

METRICS = "avar_ops/method/metrics.py"
ANSWERS = "avar_ops/grading/answers.py"
EXTRACTION = "avar_ops/grading/extraction.py"
VALUES = "avar_ops/grading/values.py"
REWARDS = "training/grpo/rewards.py"
GRPO = "training/grpo/trainer.py"
LOSS = "training/grpo/loss.py"
SFT = "training/sft/trainer.py"

T_METRICS = ("tests/test_metrics.py", "tests/test_vas.py")
T_ANSWERS = ("tests/test_answers.py",)
T_GRADING = ("tests/test_grading_extraction.py", "tests/test_answers.py", "tests/test_scoring_corpus.py")
T_REWARDS = ("tests/test_train_grpo_rewards.py", "tests/test_train_grpo_wiring.py")
T_GRPO = ("tests/test_train_grpo_wiring.py", "tests/test_train_grpo.py")
T_LOSS = ("tests/test_train_grpo_loss.py",)
T_SFT = ("tests/test_train_sft_wiring.py", "tests/test_train_sft.py")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    original: str
    mutated: str
    tests: Tuple[str, ...]
    equivalent: str = ""  # why the mutant cannot be told apart from the original, where it cannot


MUTANTS: List[Mutant] = [
    # ------------------------------------------------------------------------------------ method: VAS
    Mutant("vas: ratio over visual + eps", METRICS, "denom = system + eps  #", "denom = visual + eps  #", T_METRICS),
    Mutant(
        "vas: image mass divided by |Q| + 1",
        METRICS,
        "visual_mean = visual_sum / n_query_safe[None, :, None]",
        "visual_mean = visual_sum / (n_query_safe[None, :, None] + 1)",
        T_METRICS,
    ),
    Mutant(
        "vas: per-sample max instead of mean",
        METRICS,
        "vas_red = reduction(ratio_mean, ratio_mean.mean(-1), ratio_mean.mean(dim=(0, 2)))",
        "vas_red = reduction(ratio_mean, ratio_mean.mean(-1), ratio_mean.amax(dim=(0, 2)))",
        T_METRICS,
    ),
    Mutant(
        "vas: samples weighed by B, not by the valid count",
        METRICS,
        "sample_w = valid.to(torch.float64) / valid.sum()",
        "sample_w = valid.to(torch.float64) / B",
        T_METRICS,
    ),
    Mutant(
        "vas: queries not masked in the ratio mean",
        METRICS,
        "ratio_mean = (ratio * qw[None, :, None]).sum(-1)",
        "ratio_mean = ratio.sum(-1)",
        T_METRICS,
    ),
    # ----------------------------------------------------------------------------------- method: AGTO
    Mutant(
        "agto: enhance sign flipped",
        METRICS,
        "enhance = -mean_log_pair_attention(visual_q, n_image)",
        "enhance = mean_log_pair_attention(visual_q, n_image)",
        T_METRICS,
    ),
    Mutant(
        "agto: suppress sign flipped",
        METRICS,
        "suppress = mean_log_pair_attention(system_q, n_system)",
        "suppress = -mean_log_pair_attention(system_q, n_system)",
        T_METRICS,
    ),
    Mutant(
        "agto: suppress normalised by the image key count",
        METRICS,
        "suppress = mean_log_pair_attention(system_q, n_system)",
        "suppress = mean_log_pair_attention(system_q, n_image)",
        T_METRICS,
    ),
    Mutant(
        "agto: pairs |Q| + |K| instead of |Q|·|K|",
        METRICS,
        "pairs = torch.where(included, n_query * n_keys, torch.ones_like(n_query))",
        "pairs = torch.where(included, n_query + n_keys, torch.ones_like(n_query))",
        T_METRICS,
    ),
    Mutant(
        "agto: log of the layer mean instead of mean of logs",
        METRICS,
        "return torch.log(per_pair + eps).mean(dim=(0, 2))",
        "return torch.log(per_pair.mean(0) + eps).mean(dim=1)",
        T_METRICS,
    ),
    Mutant(
        "agto: samples without system tokens included",
        METRICS,
        "included = (n_query > 0) & (n_image > 0) & (n_system > 0)",
        "included = (n_query > 0) & (n_image > 0)",
        T_METRICS,
    ),
    # --------------------------------------------------------------------------------- method: reward
    Mutant(
        "visual_reward: mean of per-head ratios",
        METRICS,
        "ratio = vis / (sys_ + eps)  # [NL, B, L]",
        "ratio = (visual / (system + eps)).mean(2)  # [NL, B, L]",
        T_METRICS,
    ),
    Mutant(
        "visual_reward: sum over layers",
        METRICS,
        "reward = (ratio.mean(0) * rw).sum(-1) / safe_n  # [B]",
        "reward = (ratio.sum(0) * rw).sum(-1) / safe_n  # [B]",
        T_METRICS,
    ),
    Mutant(
        "visual_reward: divided by |response| + 1",
        METRICS,
        "safe_n = torch.where(has_response, n_response, torch.ones_like(n_response))  # [B]",
        "safe_n = torch.where(has_response, n_response + 1, torch.ones_like(n_response))  # [B]",
        T_METRICS,
    ),
    # ----------------------------------------------------------------------------------------- grading
    Mutant(
        "answers: first <answer> tag",
        EXTRACTION,
        "for tag in reversed(_ANSWER_TAG.findall(response)):",
        "for tag in _ANSWER_TAG.findall(response):",
        T_GRADING,
    ),
    Mutant(
        "answers: trailing period kept",
        EXTRACTION,
        '        s = s.rstrip(".").strip()\n        if s == before:',
        "        s = s.strip()\n        if s == before:",
        T_GRADING,
    ),
    Mutant(
        "answers: first parenthesised letter",
        EXTRACTION,
        "return chosen[-1][1], rule",
        "return chosen[0][1], rule",
        T_GRADING,
    ),
    Mutant(
        "answers: negative fractions lose their sign",
        VALUES,
        'if self.take("op", "-"):\n            return -self.unary()',
        'if self.take("op", "-"):\n            return self.unary()',
        T_GRADING,
    ),
    Mutant(
        "answers: first mention of an option text",
        EXTRACTION,
        'return max(found)[1], "option_text"',
        'return min(found)[1], "option_text"',
        T_GRADING,
    ),
    Mutant(
        "answers: precision compared one decimal finer",
        ANSWERS,
        "return round(pred, precision) == round(gold, precision)",
        "return round(pred, precision + 1) == round(gold, precision + 1)",
        T_ANSWERS,
    ),
    Mutant(
        "answers: numbers compared exactly",
        ANSWERS,
        "return math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=abs_tol)",
        "return pred == gold",
        T_ANSWERS,
    ),
    # ------------------------------------------------------------------------------- training: rewards
    Mutant(
        "VisualStats: ratio over the user mass",
        REWARDS,
        '"system": head_mean[..., _SYSTEM] * resp,  # [B, R]',
        '"system": head_mean[..., 3] * resp,  # [B, R]',
        T_REWARDS,
    ),
    Mutant(
        "VisualStats: ratio over every query",
        REWARDS,
        'ratio = visual_reward(masses, resp, eps, empty="zero", kind=kind, cap=cap)',
        'ratio = visual_reward(masses, torch.ones_like(resp), eps, empty="zero", kind=kind, cap=cap)',
        T_REWARDS,
    ),
    Mutant(
        "VisualStats: VAS over the response tokens",
        REWARDS,
        'out["vas"] = (per_head.mean(1) * self.user.to(m.device)).sum(-1)',
        'out["vas"] = (per_head.mean(1) * self.response.to(m.device)).sum(-1)',
        T_REWARDS,
    ),
    Mutant(
        "visual_terms: VAS over the chosen layers only",
        REWARDS,
        'total = torch.stack([per_layer[i]["vas"].cpu() for i in range(n_layers)]).mean(0)',
        'total = torch.stack([per_layer[i]["vas"].cpu() for i in chosen]).mean(0)',
        T_REWARDS,
    ),
    Mutant(
        "visual_terms: no zero for empty responses",
        REWARDS,
        'visual_reward(masses, resp, eps, empty="zero", kind=kind, cap=cap)',
        'visual_reward(masses, resp, eps, empty="error", kind=kind, cap=cap)',
        T_REWARDS,
    ),
    Mutant(
        "combine_rewards: no gate",
        REWARDS,
        "visual = torch.where(correct, visual, torch.zeros_like(visual))",
        "visual = visual",
        T_REWARDS,
    ),
    Mutant(
        "combine_rewards: correct only above 1",
        REWARDS,
        "correct = (accuracy >= 1.0) if correct is None",
        "correct = (accuracy > 1.0) if correct is None",
        T_REWARDS,
    ),
    Mutant(
        "combine_rewards: the ungated reward in the total",
        REWARDS,
        "total = accuracy + lambda_visual * visual + lambda_format * fmt",
        "total = accuracy + lambda_visual * visual_raw + lambda_format * fmt",
        T_REWARDS,
    ),
    Mutant(
        "combine_rewards: cap as a floor",
        REWARDS,
        "visual_raw.clamp(max=float(visual_reward_max))",
        "visual_raw.clamp(min=float(visual_reward_max))",
        T_REWARDS,
    ),
    Mutant(
        "format_reward: search instead of full match",
        REWARDS,
        "1.0 if compiled.fullmatch(c) else 0.0",
        "1.0 if compiled.search(c) else 0.0",
        T_REWARDS,
    ),
    Mutant(
        "accuracy_reward: timeouts scored as right",
        REWARDS,
        'return [1.0 if s == "correct" else 0.0 for s in statuses]',
        'return [1.0 if s != "incorrect" else 0.0 for s in statuses]',
        T_REWARDS,
    ),
    # ------------------------------------------------------------------------------ training: GRPO loop
    Mutant(
        "completion_mask: EOS itself excluded",
        GRPO,
        "before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()",
        "before = torch.cumsum(is_eos.long(), dim=1)",
        T_GRPO,
    ),
    Mutant(
        "completion_mask: one token past the first EOS",
        GRPO,
        "    return before == 0\n",
        "    return before <= 1\n",
        T_GRPO,
    ),
    Mutant(
        "assemble: response mask counts padding after EOS",
        GRPO,
        "response_mask=torch.cat([zeros_p, cmask], dim=1)",
        "response_mask=torch.cat([zeros_p, torch.ones_like(cmask)], dim=1)",
        T_GRPO,
    ),
    Mutant(
        "assemble: prompt VAS over system tokens",
        GRPO,
        "user_mask=torch.cat([groups.user_mask, zeros_c], dim=1)",
        "user_mask=torch.cat([groups.system_mask, zeros_c], dim=1)",
        T_GRPO,
    ),
    Mutant(
        "assemble: padding after EOS attended",
        GRPO,
        'inputs["attention_mask"] = torch.cat([prompt_att, cmask.to(prompt_att.dtype)], dim=1)',
        'inputs["attention_mask"] = torch.cat([prompt_att, torch.ones_like(cmask).to(prompt_att.dtype)], dim=1)',
        T_GRPO,
        equivalent="the positions after a completion's EOS are keys only for queries after it (causal attention), "
        "and no log-prob, mask or reward reads those queries; the prompts' left padding keeps its mask",
    ),
    Mutant(
        "assemble: tokens after EOS kept",
        GRPO,
        "completion_ids = completion_ids.masked_fill(~cmask, self.pad_id)",
        "completion_ids = completion_ids",
        T_GRPO,
    ),
    Mutant(
        "rewards: correctness verdict ignored before gating",
        GRPO,
        "            terms.ratio,\n",
        "            terms.ratio,\n            correct=torch.ones(len(acc), dtype=torch.bool),\n",
        T_GRPO,
    ),
    Mutant(
        "scoring: logits shifted the wrong way",
        GRPO,
        "logits = out.logits[:, :-1]  # [N, C, V]",
        "logits = out.logits[:, 1:]  # [N, C, V]",
        T_GRPO,
    ),
    Mutant(
        "completion_logps: no normalisation",
        GRPO,
        "rows.append(picked - torch.logsumexp(row, dim=-1))",
        "rows.append(picked)",
        T_GRPO,
    ),
    Mutant(
        "train_step: advantages from r_acc only",
        GRPO,
        "adv = self._advantages(breakdown.total).to(logps.device)",
        "adv = self._advantages(breakdown.accuracy).to(logps.device)",
        T_GRPO,
    ),
    Mutant(
        "update: advantages negated",
        GRPO,
        "res = policy_loss(logps, old, adv.to(logps.dtype), ro.completion_mask, **loss_kwargs)",
        "res = policy_loss(logps, old, -adv.to(logps.dtype), ro.completion_mask, **loss_kwargs)",
        T_GRPO,
    ),
    Mutant(
        "log: prompt VAS shows r_visual",
        GRPO,
        '"prompt_vas": mean(terms.prompt_vas),',
        '"prompt_vas": mean(terms.ratio),',
        T_GRPO,
    ),
    Mutant(
        "log: accuracy from r_acc",
        GRPO,
        '"accuracy": mean(br.correct.double()),',
        '"accuracy": mean(br.accuracy),',
        T_GRPO,
    ),
    # ------------------------------------------------------------------------------- training: GRPO loss
    Mutant(
        "advantages: std guard 1 instead of 1e-4",
        LOSS,
        "return centred / (std + STD_EPS)",
        "return centred / (std + 1.0)",
        T_LOSS,
    ),
    Mutant(
        "advantages: biased std",
        LOSS,
        "std = groups.std(dim=1).repeat_interleave(num_generations)",
        "std = groups.std(dim=1, unbiased=False).repeat_interleave(num_generations)",
        T_LOSS,
    ),
    Mutant(
        "policy_loss: max instead of min",
        LOSS,
        "per_token = -torch.min(ratio * adv, clipped * adv)",
        "per_token = -torch.max(ratio * adv, clipped * adv)",
        T_LOSS,
    ),
    Mutant(
        "policy_loss: KL estimator without the -1",
        LOSS,
        "per_token_kl = torch.exp(delta) - delta - 1.0",
        "per_token_kl = torch.exp(delta) - delta",
        T_LOSS,
    ),
    # -------------------------------------------------------------------------------------- training: SFT
    Mutant(
        "sft: suppress term subtracted",
        SFT,
        "+ self.agto.beta * suppress.to(lm.dtype)",
        "- self.agto.beta * suppress.to(lm.dtype)",
        T_SFT,
    ),
    Mutant(
        "sft: image and system key masks swapped",
        SFT,
        'masks["image_mask"].to(lm.device),\n            masks["system_mask"].to(lm.device),',
        'masks["system_mask"].to(lm.device),\n            masks["image_mask"].to(lm.device),',
        T_SFT,
    ),
    Mutant(
        "sft: alpha weighs the suppress term",
        SFT,
        "+ self.agto.beta * suppress.to(lm.dtype)",
        "+ self.agto.alpha * suppress.to(lm.dtype)",
        T_SFT,
    ),
    Mutant(
        "sft: sum over user queries instead of the mean",
        SFT,
        "weight = user.to(mass.dtype) / user.sum(-1, keepdim=True).clamp(min=1).to(mass.dtype)",
        "weight = user.to(mass.dtype)",
        T_SFT,
    ),
    Mutant(
        "sft: mean-over-queries backward doubled",
        SFT,
        "return grad * ctx.weight[:, None, :, None], None",
        "return 2 * grad * ctx.weight[:, None, :, None], None",
        T_SFT,
    ),
]


def _copy_tree(dest: str) -> None:
    """The sources, tests, scripts and the built extension; not .git, .venv or build outputs."""
    skip = {".git", ".venv", "build", ".pytest_cache", ".ruff_cache", "__pycache__"}

    def ignore(folder, names):
        return [n for n in names if n in skip or n.endswith(".egg-info")]

    for name in os.listdir(ROOT):
        if name in skip or name.endswith(".egg-info"):
            continue
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name), ignore=ignore, symlinks=True)
        else:
            shutil.copy2(src, os.path.join(dest, name))
    # avar_train is installed from training/ under another name: the copy provides that name on its path.
    os.symlink("training", os.path.join(dest, "avar_train"))


def _check(m: Mutant) -> None:
    with open(os.path.join(ROOT, m.path), encoding="utf-8") as f:
        text = f.read()
    n = text.count(m.original)
    if n != 1:
        raise SystemExit(f"mutant {m.name!r}: its original snippet occurs {n} times in {m.path} (want 1)")
    for t in m.tests:
        if not os.path.isfile(os.path.join(ROOT, t)):
            raise SystemExit(f"mutant {m.name!r}: no test file {t}")


def _pytest(tree: str, tests: Tuple[str, ...], timeout: float) -> Tuple[Optional[int], float, str]:
    """(return code or None on timeout, seconds, the first failure or the summary line)."""
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0, f"no result within {timeout:.0f} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED") or ln.startswith("ERROR")]
    detail = lines[0] if lines else proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return proc.returncode, time.perf_counter() - t0, detail


def _run(tree: str, m: Mutant, timeout: float) -> Tuple[str, float, str]:
    path = os.path.join(tree, m.path)
    with open(path, encoding="utf-8") as f:
        original = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(original.replace(m.original, m.mutated, 1))
    try:
        code, seconds, detail = _pytest(tree, m.tests, timeout)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    status = "timeout" if code is None else "killed" if code != 0 else "survived"
    return status, seconds, detail


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return rev.stdout.strip() + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write(results: List[dict], command: str, commit: str, out: Optional[str]) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    base = out or os.path.join(RESULTS, "mutation_report")
    killed = sum(r["status"] == "killed" for r in results)
    report = {
        "command": command,
        "commit": commit,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": list(os.getloadavg()),
        "mutants": len(results),
        "killed": killed,
        "survived": [r for r in results if r["status"] != "killed"],
        "results": results,
    }
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    lines = [
        "# Mutation check",
        "",
        f"`{command}` at commit {commit}, {report['date_utc']}, load average "
        f"{', '.join(f'{x:.1f}' for x in report['load_average'])}.",
        "",
        f"{killed} of {len(results)} planted mutants killed by their test files.",
        "",
        "| # | mutant | file | status | seconds | first failure | run |",
        "|---|---|---|---|---|---|---|",
    ]
    runs = sorted({(r["run"]["command"], r["run"]["commit"]) for r in results if "run" in r})
    for r in results:
        detail = r["detail"].replace("|", "\\|")[:120]
        run = runs.index((r["run"]["command"], r["run"]["commit"])) + 1 if "run" in r else ""
        lines.append(
            f"| {r['index']} | {r['name']} | {r['path']} | {r['status']} | {r['seconds']:.0f} | {detail} | {run} |"
        )
    survivors = [r for r in results if r["status"] != "killed"]
    if survivors:
        lines += ["", "Not killed, and why:", ""]
        for r in survivors:
            why = r.get("equivalent") or "no test catches it yet"
            lines.append(f"- {r['index']} {r['name']} ({r['status']}): {why}")
    lines += ["", "Runs:", ""] + [f"{n}. `{c}` at {commit}" for n, (c, commit) in enumerate(runs, 1)]
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=int, nargs="*", help="indices of the mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (default 900)")
    parser.add_argument("--tests", nargs="+", help="run these test files instead of each mutant's own")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the other mutants' results of the existing report and replace those of the ones run",
    )
    parser.add_argument("--out", help="report path without extension (default benchmarks/results/mutation_report)")
    args = parser.parse_args(argv)
    for m in MUTANTS:
        _check(m)
    chosen = list(range(len(MUTANTS))) if not args.only else args.only
    bad = [i for i in chosen if not 0 <= i < len(MUTANTS)]
    if bad:
        parser.error(f"--only: indices {bad} are not in [0, {len(MUTANTS)})")
    if args.list:
        for i in chosen:
            print(f"{i:3d}  {MUTANTS[i].name}  ({MUTANTS[i].path})")
        return 0
    command = "python scripts/mutation_check.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    commit = _commit()
    results = []
    base = args.out or os.path.join(RESULTS, "mutation_report")
    if args.update and os.path.isfile(base + ".json"):
        with open(base + ".json", encoding="utf-8") as f:
            old = json.load(f)
        # Results of mutants not rerun now stay, with the command and commit they were obtained at.
        results = [
            dict(r, run=r.get("run", {"command": old["command"], "commit": old["commit"]}))
            for r in old["results"]
            if r["index"] not in chosen
        ]
    with tempfile.TemporaryDirectory(prefix="avar-mutants-") as tree:
        _copy_tree(tree)
        # The unmutated tree must pass every test set used, or a failing set would count as kills.
        for tests in sorted({(MUTANTS[i].tests if not args.tests else tuple(args.tests)) for i in chosen}):
            code, seconds, detail = _pytest(tree, tests, args.timeout)
            if code != 0:  # once more: a timing-sensitive test can fail on a loaded machine
                print(f"baseline {' '.join(tests)} failed ({detail}); once more", flush=True)
                code, seconds, detail = _pytest(tree, tests, args.timeout)
            print(f"baseline {' '.join(tests)}: {'passes' if code == 0 else 'FAILS'} ({seconds:.0f} s)", flush=True)
            if code != 0:
                raise SystemExit(f"the unmutated tree fails {' '.join(tests)}: {detail}")
        for i in chosen:
            m = MUTANTS[i] if not args.tests else replace(MUTANTS[i], tests=tuple(args.tests))
            status, seconds, detail = _run(tree, m, args.timeout)
            run = {"command": command, "commit": commit}
            results.append(dict(index=i, **asdict(m), status=status, seconds=seconds, detail=detail, run=run))
            results.sort(key=lambda r: r["index"])
            print(f"{i:3d} {status:8s} {seconds:6.0f}s  {m.name}", flush=True)
            _write(results, command, commit, args.out)
    killed = sum(r["status"] == "killed" for r in results)
    print(f"{killed} of {len(results)} killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
