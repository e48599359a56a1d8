"""VARS rewards on hand-made rollouts and masses, against values worked out by hand: gating, the mean over
response tokens only (prompt and padding excluded, left and right padding), chosen layers, the cap, format and
accuracy rewards with TRL's signature."""

import pytest
import torch

from avar_ops.method import visual_reward
from avar_train.grpo.rewards import (
    AccuracyReward,
    VisualStats,
    call_reward_function,
    combine_rewards,
    format_reward,
    load_reward_function,
    visual_terms,
)

EPS = 1e-6


def _mass(image, system):
    """A mass [4] with the given image and system shares (the rest on 'other'; user text 0)."""
    return [1.0 - image - system, image, system, 0.0]


def _hand_masses():
    """Two layers, two sequences, two heads, five positions, with the response spans below.

    Sequence 0 is left-padded: padding, prompt, prompt, response, response.
    Sequence 1 is right-padded: prompt, response, response, response, padding.
    """
    m = torch.zeros(2, 2, 2, 5, 4, dtype=torch.float64)  # [NL, B, H, L, G]
    vals = {  # (layer, seq, pos) -> ((img_h0, sys_h0), (img_h1, sys_h1))
        (0, 0, 3): ((0.4, 0.2), (0.2, 0.2)),
        (0, 0, 4): ((0.3, 0.1), (0.3, 0.1)),
        (1, 0, 3): ((0.5, 0.5), (0.1, 0.1)),
        (1, 0, 4): ((0.6, 0.3), (0.2, 0.1)),
        (0, 1, 1): ((0.1, 0.4), (0.3, 0.0)),
        (0, 1, 2): ((0.2, 0.2), (0.2, 0.2)),
        (0, 1, 3): ((0.9, 0.05), (0.5, 0.05)),
        (1, 1, 1): ((0.2, 0.1), (0.2, 0.3)),
        (1, 1, 2): ((0.0, 0.5), (0.0, 0.5)),
        (1, 1, 3): ((0.4, 0.4), (0.4, 0.4)),
    }
    for (layer, seq, pos), heads in vals.items():
        for h, (img, sys) in enumerate(heads):
            m[layer, seq, h, pos] = torch.tensor(_mass(img, sys), dtype=torch.float64)
    # Prompt and padding positions carry large ratios: any leak of them into the mean shows.
    m[:, 0, :, 1:3] = torch.tensor(_mass(0.9, 0.0), dtype=torch.float64)
    m[:, 1, :, 0] = torch.tensor(_mass(0.9, 0.0), dtype=torch.float64)
    response = torch.tensor([[False, False, False, True, True], [False, True, True, True, False]])
    return m, response, vals


def _hand_ratio(vals, seq, positions, layers):
    """mean over positions of mean over layers of (mean-over-heads image) / (mean-over-heads system + ε)."""
    per_pos = []
    for pos in positions:
        per_layer = []
        for layer in layers:
            (i0, s0), (i1, s1) = vals[(layer, seq, pos)]
            per_layer.append(((i0 + i1) / 2) / ((s0 + s1) / 2 + EPS))
        per_pos.append(sum(per_layer) / len(per_layer))
    return sum(per_pos) / len(per_pos)


def _reduce(masses, response, user=None):
    stats = VisualStats(response, user, eps=EPS)
    return [stats(masses[i].to(torch.float32)) for i in range(masses.shape[0])]


def test_visual_ratio_response_tokens_only_left_and_right_padding():
    masses, response, vals = _hand_masses()
    terms = visual_terms(_reduce(masses, response), response)
    want = [_hand_ratio(vals, 0, [3, 4], [0, 1]), _hand_ratio(vals, 1, [1, 2, 3], [0, 1])]
    # Sequence 0 written out: pos 3: layer 0 0.3/0.2 = 1.5, layer 1 0.3/0.3 = 1 → 1.25;
    # pos 4: 0.3/0.1 = 3 and 0.4/0.2 = 2 → 2.5; mean 1.875 (up to ε).
    assert want[0] == pytest.approx(1.875, rel=1e-5)
    assert terms.ratio.tolist() == pytest.approx(want, rel=1e-6)
    # The library's own r_visual (all layers) agrees on the same float32 masses.
    lib = visual_reward([m.float().double() for m in masses.unbind(0)], response, eps=EPS)
    assert terms.ratio.tolist() == pytest.approx(lib.tolist(), rel=1e-12)
    # Image mass of the response tokens: sequence 0, mean over positions, layers and heads.
    img0 = (0.4 + 0.2 + 0.3 + 0.3 + 0.5 + 0.1 + 0.6 + 0.2) / 8
    assert terms.response_image_mass[0].item() == pytest.approx(img0, rel=1e-6)


def test_visual_reward_kinds_by_hand():
    """capped_ratio, ratio_of_sums and image_mass on the hand masses, worked out term by term (sequence 0)."""
    masses, response, vals = _hand_masses()
    layers = [m for m in masses.unbind(0)]
    # Sequence 0, head-averaged (image, system) per (layer, position): (0.3, 0.2), (0.3, 0.1), (0.3, 0.3),
    # (0.4, 0.2); ratios 1.5, 3, 1, 2.
    capped = visual_reward(layers, response, eps=EPS, kind="capped_ratio", cap=1.8)
    assert capped[0].item() == pytest.approx(((1.5 + 1.0) / 2 + (1.8 + 1.8) / 2) / 2, rel=1e-5)
    sums = visual_reward(layers, response, eps=EPS, kind="ratio_of_sums")
    assert sums[0].item() == pytest.approx((0.3 + 0.3 + 0.3 + 0.4) / (0.2 + 0.1 + 0.3 + 0.2 + EPS), rel=1e-12)
    image = visual_reward(layers, response, eps=EPS, kind="image_mass")
    assert image[0].item() == pytest.approx((0.3 + 0.3 + 0.3 + 0.4) / 4, rel=1e-12)
    # A cap above every term changes nothing; the trainer's path gives the library's numbers for every kind.
    plain = visual_reward(layers, response, eps=EPS)
    assert visual_reward(layers, response, eps=EPS, kind="capped_ratio", cap=1e9).tolist() == plain.tolist()
    for kind, cap in (("capped_ratio", 1.8), ("ratio_of_sums", None), ("image_mass", None)):
        terms = visual_terms(_reduce(masses, response), response, eps=EPS, kind=kind, cap=cap)
        lib = visual_reward([m.float().double() for m in layers], response, eps=EPS, kind=kind, cap=cap)
        assert terms.ratio.tolist() == pytest.approx(lib.tolist(), rel=1e-12), kind
    # The logged per-token terms: sequence 0 has (1.5 + 1) / 2 and (3 + 2) / 2, then sequence 1's three.
    tokens = visual_terms(_reduce(masses, response), response).token_ratios
    assert tokens.shape == (5,) and tokens[:2].tolist() == pytest.approx([1.25, 2.5], rel=1e-5)
    assert tokens.mean().item() != pytest.approx(plain.mean().item())  # a token mean, not a sequence mean


def test_visual_reward_kind_arguments():
    masses, response, _ = _hand_masses()
    with pytest.raises(ValueError, match="kind must be one of"):
        visual_reward(masses, response, kind="log")
    with pytest.raises(ValueError, match="'capped_ratio' needs cap, a finite number > 0"):
        visual_reward(masses, response, kind="capped_ratio")
    with pytest.raises(ValueError, match="'capped_ratio' needs cap"):
        visual_reward(masses, response, kind="capped_ratio", cap=float("inf"))
    with pytest.raises(ValueError, match="cap is only used with kind 'capped_ratio'"):
        visual_reward(masses, response, kind="ratio", cap=2.0)


def test_visual_ratio_chosen_layers():
    masses, response, vals = _hand_masses()
    terms = visual_terms(_reduce(masses, response), response, layers=[1])
    assert terms.ratio.tolist() == pytest.approx(
        [_hand_ratio(vals, 0, [3, 4], [1]), _hand_ratio(vals, 1, [1, 2, 3], [1])], rel=1e-6
    )
    with pytest.raises(ValueError, match="layers"):
        visual_terms(_reduce(masses, response), response, layers=[2])


def test_prompt_vas_from_user_tokens():
    masses, response, _ = _hand_masses()
    user = torch.zeros(2, 5, dtype=torch.bool)
    user[0, 1] = True  # image 0.9 / system 0 on every layer and head: 0.9 / ε
    terms = visual_terms(_reduce(masses, response, user), response, user)
    assert terms.prompt_vas[0].item() == pytest.approx(0.9 / EPS, rel=1e-6)


def test_prompt_vas_spans_all_layers_whatever_layers_r_visual_uses():
    masses, response, _ = _hand_masses()
    user = torch.zeros(2, 5, dtype=torch.bool)
    user[0, 3] = True  # per-head ratios: layer 0 0.4/0.2 and 0.2/0.2 (mean 1.5), layer 1 0.5/0.5 and 0.1/0.1 (1)
    terms = visual_terms(_reduce(masses, response, user), response, user, layers=[1])
    assert terms.prompt_vas[0].item() == pytest.approx((1.5 + 1.0) / 2, rel=1e-5)


def test_no_response_token_gives_zero():
    masses, response, _ = _hand_masses()
    response = response.clone()
    response[1] = False
    terms = visual_terms(_reduce(masses, response), response)
    assert terms.ratio[1].item() == 0.0 and terms.ratio[0].item() > 0


def test_gating_cap_and_weights():
    acc = torch.tensor([1.0, 0.0, 1.0, 0.0])
    fmt = torch.tensor([1.0, 1.0, 0.0, 0.0])
    raw = torch.tensor([2.0, 5.0, 12.0, 0.5])
    out = combine_rewards(acc, fmt, raw, lambda_visual=0.3, lambda_format=0.1)
    # Wrong answers get no visual reward whatever their attention.
    assert out.visual.tolist() == [2.0, 0.0, 12.0, 0.0]
    assert out.total.tolist() == pytest.approx([1 + 0.6 + 0.1, 0.1, 1 + 3.6, 0.0])
    capped = combine_rewards(acc, fmt, raw, visual_reward_max=4.0)
    assert capped.visual.tolist() == [2.0, 0.0, 4.0, 0.0]
    assert capped.visual_raw.tolist() == raw.tolist()
    assert capped.total.tolist() == pytest.approx([1.7, 0.1, 1 + 1.2, 0.0])
    extra = combine_rewards(
        acc, fmt, raw, extras={"len": torch.tensor([1.0, 2.0, 3.0, 4.0])}, extra_weights={"len": -0.5}
    )
    assert extra.total.tolist() == pytest.approx([1.7 - 0.5, 0.1 - 1.0, 4.6 - 1.5, -2.0])
    # An explicit correctness flag overrides r_acc >= 1.
    flagged = combine_rewards(acc, fmt, raw, correct=torch.tensor([False, True, False, False]))
    assert flagged.visual.tolist() == [0.0, 5.0, 0.0, 0.0]


def test_format_reward():
    f = format_reward()
    completions = [
        "<think>look at the image</think><answer>B</answer>",
        "  <think>a\nb</think>\n<answer>3</answer>\n",
        "<answer>B</answer>",
        "<think>x</think><answer>B</answer> trailing",
        "<think>x<answer>B</answer>",
    ]
    assert f([""] * 5, completions, [[]] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    custom = format_reward(r"<answer>.*</answer>")
    assert custom(["", ""], ["<answer>1</answer>", "1"], [[], []]) == [1.0, 0.0]
    # The whole completion must match, anchors or not: text around the tags fails an unanchored pattern too.
    assert custom(["", ""], ["so <answer>1</answer>", "<answer>1</answer> done"], [[], []]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="regular expression"):
        format_reward("(")


def test_accuracy_reward_counts_timeouts_and_errors():
    def checker(completions, references):
        return [{"ok": "correct", "no": "incorrect", "slow": "timeout", "bad": "error"}[c] for c in completions]

    r = AccuracyReward(checker)
    got = r(["p"] * 4, ["ok", "no", "slow", "bad"], [[1]] * 4, answer=["1", "1", "1", "1"])
    assert got == [1.0, 0.0, 0.0, 0.0]
    assert r.counts == {"correct": 1, "incorrect": 1, "timeout": 1, "error": 1}
    assert r.last_statuses == ["correct", "incorrect", "timeout", "error"]
    with pytest.raises(KeyError, match="answer"):
        r(["p"], ["ok"], [[1]], solution=["1"])
    with pytest.raises(ValueError, match="statuses"):
        AccuracyReward(lambda c, ref: ["maybe"])(["p"], ["x"], [[1]], answer=["1"])


def test_reward_function_checks():
    ok = call_reward_function("n", lambda p, c, ids, **k: [len(x) for x in c], ["a", "b"], ["xy", "z"], [[1], [2]], {})
    assert ok.tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="returned 1 values"):
        call_reward_function("n", lambda p, c, ids, **k: [0.0], ["a", "b"], ["x", "y"], [[1], [2]], {})
    with pytest.raises(ValueError, match="non-finite"):
        call_reward_function("n", lambda p, c, ids, **k: [float("nan")], ["a"], ["x"], [[1]], {})
    assert load_reward_function("avar_train.grpo.rewards:format_reward") is format_reward
    with pytest.raises(ValueError, match="module:function"):
        load_reward_function("format_reward")


def test_default_accuracy_uses_the_shared_checker():
    r = AccuracyReward()
    completions = [
        "<think>look</think><answer>(B)</answer>",
        "The answer is 3.50",
        "<answer>C</answer>",
        "so \\boxed{\\frac{1}{2}}",
    ]
    got = r([""] * 4, completions, [[1]] * 4, answer=["B", "3.5", "B", "0.5"])
    assert got == [1.0, 1.0, 0.0, 1.0]
    assert r.counts["correct"] == 3 and r.counts["incorrect"] == 1


def test_a_reward_function_that_raises_is_named():
    from grpo_fixtures import raising_reward

    from avar_train.grpo.rewards import RewardError, call_reward_function

    with pytest.raises(RewardError, match=r"^reward function 'my_reward' raised KeyError: 'score'$"):
        call_reward_function("my_reward", raising_reward, ["p"], ["c"], [[1]], {"answer": ["a"]})
