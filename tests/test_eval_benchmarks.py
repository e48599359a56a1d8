"""Benchmark loaders on tiny files in each release's format; schema errors; each benchmark's protocol
(HallusionBench's split, rules and three accuracies, MMMU-Pro's three settings, MathVerse's prompt field),
the per-category tables and the seeded subset."""

import math
import random

import eval_fixtures
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from avar_ops.eval import (
    BENCHMARKS,
    BenchmarkDataError,
    Sample,
    get_benchmark,
    hallusion_scores,
    ids_digest,
    sample_subset,
)
from avar_ops.grading import AnswerSpec, score
from avar_ops.grading.answers import CheckResult


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return eval_fixtures.write_all(str(tmp_path_factory.mktemp("bench")))


def test_every_benchmark_loads_with_lazy_images(data):
    for name, folder in data.items():
        samples = get_benchmark(name).load(folder)
        assert samples, name
        for s in samples:
            assert s.benchmark == name and s.prompt.strip()
            for image in s.images:
                assert image.load().mode == "RGB"


def test_mathvista(data):
    a, b, c = get_benchmark("mathvista").load(data["mathvista"])
    assert a.prompt.startswith("Hint: answer with the option letter.")  # the release's own query
    assert (a.answer.kind, a.answer.gold, a.answer.options) == ("choice", "B", ["30°", "45°", "60°"])
    assert (b.answer.kind, b.answer.gold, b.answer.precision) == ("number", "2.44", 2)
    assert (c.answer.kind, c.answer.gold, c.answer.precision) == ("number", "7", None)
    assert b.fields["unit"] == "cm"


def test_mathvision_mathverse_mmstar(data):
    choice, free = get_benchmark("mathvision").load(data["mathvision"])
    assert "(A)" not in choice.prompt and "A. A" in choice.prompt and "\\boxed{}" in choice.prompt
    assert "<image1>" not in choice.prompt
    assert (choice.answer.kind, choice.answer.gold, choice.answer.num_options) == ("choice", "C", 5)
    assert (free.answer.kind, free.answer.gold) == ("auto", "2\\sqrt{3}")
    verse = get_benchmark("mathverse").load(data["mathverse"])
    assert [s.id for s in verse] == ["1", "3", "4"]  # only the Vision Only version
    assert (verse[2].answer.kind, verse[2].answer.gold) == ("auto", "5 cm")  # a value, not a letter
    assert verse[0].prompt.startswith("According to the image") and verse[0].answer.gold == "B"
    assert [s.fields["problem_version"] for s in verse] == ["Vision Only"] * 3
    star = get_benchmark("mmstar").load(data["mmstar"])
    assert [s.answer.gold for s in star] == ["A", "D"] and "Options: A: red" in star[0].prompt
    assert star[1].fields == {
        "category": "fine-grained perception",
        "l2_category": "counting",
        "question": "How many dots?\nOptions: A: 1, B: 2, C: 3, D: 4",  # the scorer reads the options from it
        "answer": "D",
    }


def test_mmmu_and_pro(data):
    samples = get_benchmark("mmmu").load(data["mmmu"])
    assert [s.id for s in samples] == ["validation_Art_1", "validation_Art_2", "validation_Math_3"]
    first, second, open_q = samples
    assert "(A) Baroque\n(B) Gothic\n(C) Modern" in first.prompt and first.answer.gold == "B"
    assert len(first.images) == 1 and len(second.images) == 2
    assert (open_q.answer.kind, open_q.answer.gold, open_q.answer.alternatives) == ("auto", "24", ("24.0",))
    assert "single word" in open_q.prompt
    assert [s.id for s in get_benchmark("mmmu").load(data["mmmu"], split="dev")] == ["dev_Math_9"]
    assert [s.fields["subject"] for s in samples] == ["Art", "Art", "Math"]  # from the id (no subject column)


def test_mmmu_pro_reads_its_three_settings(data):
    pro = get_benchmark("mmmu_pro")
    samples = pro.load(data["mmmu_pro"])
    assert [s.id for s in samples] == [
        "standard10/test_Art_1",
        "standard10/test_Art_Theory_2",
        "standard4/test_Art_1",
        "standard4/test_Art_Theory_2",
        "vision/test_Art_1",
        "vision/test_Art_Theory_2",
    ]
    ten, _, four, _, vision, _ = samples
    assert (ten.answer.gold, ten.answer.num_options) == ("J", 10) and "(J) opt9" in ten.prompt
    assert (four.answer.gold, four.answer.num_options) == ("C", 4) and "(C) opt9" in four.prompt
    # the vision setting: the screenshot holds question and options; the text is the instruction only
    assert (vision.answer.gold, vision.answer.num_options, len(vision.images)) == ("J", 10, 1)
    assert "opt9" not in vision.prompt and "Pick one" not in vision.prompt
    assert {s.fields["setting"] for s in samples} == {"standard10", "standard4", "vision"}
    assert samples[1].fields["subject"] == "Art_Theory"
    only = pro.load(data["mmmu_pro"], split="vision")
    assert [s.id for s in only] == ["test_Art_1", "test_Art_Theory_2"] and "setting" not in only[0].fields
    with pytest.raises(BenchmarkDataError, match="reads standard10, standard4, vision from the release's folder"):
        pro.load(data["mmmu_pro"] + "/vision/test-00000-of-00001.parquet")
    # each setting is scored apart; the headline is MMMU-Pro's overall: the mean of standard10 and vision
    right = [True, False, True, True, False, False]
    scores = pro.score(samples, [_result(x) for x in right])
    per = scores["settings"]
    assert (per["standard10"]["accuracy"], per["standard4"]["accuracy"], per["vision"]["accuracy"]) == (50, 100, 0)
    assert scores["accuracy"] == pytest.approx(25.0) and scores["n"] == 6
    assert scores["accuracy_rule"] == "mean of standard10 and vision"
    tables = pro.breakdown_tables(samples, [_result(x) for x in right])
    assert tables["subject"]["Art"]["n"] == 3 and tables["subject"]["Art"]["accuracy"] == pytest.approx(200 / 3)
    # one main setting read: the headline is that setting
    one = pro.score(samples[:4], [_result(x) for x in right[:4]])
    assert one["accuracy"] == 50.0 and one["accuracy_rule"] == "one main setting read"


def test_mathverse_prompt_field_and_versions(data):
    verse = get_benchmark("mathverse")
    cot = verse.load(data["mathverse"])
    wo = verse.load(data["mathverse"], options={"prompt_field": "query_wo"})
    assert [s.prompt for s in wo] == ["Directly: " + s.prompt for s in cot]
    every = verse.load(data["mathverse"], split="all")
    assert [s.fields["problem_version"] for s in every] == [
        "Vision Only",
        "Text Dominant",
        "Vision Only",
        "Vision Only",
    ]
    with pytest.raises(ValueError, match="option prompt_field expected one of query_cot, query_wo, got 'query'"):
        verse.load(data["mathverse"], options={"prompt_field": "query"})
    with pytest.raises(ValueError, match="unknown option 'prompt'"):
        verse.load(data["mathverse"], options={"prompt": "query_wo"})


def test_per_category_tables(data):
    vista = get_benchmark("mathvista")
    samples = vista.load(data["mathvista"])
    assert samples[0].fields["skills"] == "geometry reasoning; algebraic reasoning"
    tables = vista.breakdown_tables(samples, [_result(x) for x in (True, False, None)])
    # a sample counts under each of its skills; a timeout is counted, not scored
    assert {k: (v["n"], v["n_scored"], v["n_correct"]) for k, v in tables["skills"].items()} == {
        "algebraic reasoning": (1, 1, 1),
        "arithmetic reasoning": (1, 0, 0),
        "geometry reasoning": (2, 2, 1),
    }
    assert tables["task"]["geometry problem solving"]["accuracy"] == 50.0
    assert math.isnan(tables["task"]["visual question answering"]["accuracy"])
    vision = get_benchmark("mathvision")
    tables = vision.breakdown_tables(vision.load(data["mathvision"]), [_result(True), _result(False)])
    assert {k: v["accuracy"] for k, v in tables["level"].items()} == {"2": 100.0, "3": 0.0}
    assert set(tables["subject"]) == {"metric geometry - angle", "metric geometry - area"}
    star = get_benchmark("mmstar")
    tables = star.breakdown_tables(star.load(data["mmstar"]), [_result(False), _result(True)])
    assert tables["category"]["fine-grained perception"]["accuracy"] == 100.0
    assert set(tables["l2_category"]) == {"image scene", "counting"}
    mmmu = get_benchmark("mmmu")
    tables = mmmu.breakdown_tables(mmmu.load(data["mmmu"]), [_result(x) for x in (True, True, False)])
    assert {k: v["accuracy"] for k, v in tables["subject"].items()} == {"Art": 100.0, "Math": 0.0}
    verse = get_benchmark("mathverse")
    every = verse.load(data["mathverse"], split="all")
    tables = verse.breakdown_tables(every, [_result(x) for x in (True, False, True, False)])
    assert {k: v["accuracy"] for k, v in tables["problem_version"].items()} == {
        "Text Dominant": 0.0,
        "Vision Only": pytest.approx(200 / 3),
    }
    hall = get_benchmark("hallusionbench")
    tables = hall.breakdown_tables(hall.load(data["hallusionbench"]), [_result(True)] * 5)
    assert {k: v["n"] for k, v in tables["category"].items()} == {"VD": 4, "VS": 1}


def test_limit(data):
    assert len(get_benchmark("mmmu").load(data["mmmu"], limit=2)) == 2
    with pytest.raises(ValueError, match="limit"):
        get_benchmark("mmmu").load(data["mmmu"], limit=0)
    with pytest.raises(ValueError, match="sample: expected a positive integer"):
        get_benchmark("mmmu").load(data["mmmu"], sample=0)
    with pytest.raises(ValueError, match="give one of them"):
        get_benchmark("mmmu").load(data["mmmu"], limit=1, sample=1)


def _fake(n, name="mathvista"):
    return [Sample(name, "q%d" % i, "question %d" % i, [], AnswerSpec("A", "text")) for i in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2, 7, 123])
def test_sample_subset_is_fixed_nested_and_order_free(seed):
    """The subset depends only on (seed, benchmark, ids): the same for every model and row order, in file
    order, and the subset of n is inside the subset of n + k (a run can grow without redoing answers)."""
    samples = _fake(300)
    picked = sample_subset(samples, 200, seed)
    chosen = {s.id for s in picked}
    assert len(picked) == 200 and len(chosen) == 200
    assert [s.id for s in picked] == [s.id for s in samples if s.id in chosen]  # file order kept
    shuffled = samples[:]
    random.Random(seed).shuffle(shuffled)
    assert {s.id for s in sample_subset(shuffled, 200, seed)} == chosen
    assert {s.id for s in sample_subset(samples, 50, seed)} <= chosen
    assert {s.id for s in sample_subset(samples, 200, seed + 1000)} != chosen
    assert ids_digest(picked) == ids_digest(list(reversed(picked)))
    assert sample_subset(samples, 500, seed) == samples  # more than there are: all of them
    # another benchmark with the same ids gets its own subset
    assert {s.id for s in sample_subset(_fake(300, "mmstar"), 200, seed)} != chosen


def test_sample_through_load(data):
    vista = get_benchmark("mathvista")
    one = vista.load(data["mathvista"], sample=1, sample_seed=3)
    assert len(one) == 1 and [s.id for s in one] == [s.id for s in sample_subset(vista.load(data["mathvista"]), 1, 3)]


def test_hallusionbench_protocol(data):
    hall = get_benchmark("hallusionbench")
    samples = hall.load(data["hallusionbench"])  # the image split by default, as lmms-eval and VLMEvalKit
    assert len(samples) == 5 and all(len(s.images) == 1 for s in samples)
    assert [s.answer.gold for s in samples] == ["yes", "no", "no", "yes", "no"]
    # the question as written: no instruction appended unless asked for
    assert samples[0].prompt == "Is the left line longer? (VD/0/0)"
    asked = hall.load(data["hallusionbench"], options={"instruction": "yes_no"})
    assert asked[0].prompt == "Is the left line longer? (VD/0/0)\nAnswer yes or no."
    every = hall.load(data["hallusionbench"], split="all")
    assert len(every) == 6 and every[5].images == [] and every[5].fields["figure_id"] == "0"


def _result(ok, extracted=None):
    if ok is None:
        return CheckResult("timeout", None, "full", "text")
    return CheckResult("correct" if ok else "incorrect", "yes" if extracted is None else extracted, "full", "text")


def test_hallusion_scores_by_hand(data):
    samples = get_benchmark("hallusionbench").load(data["hallusionbench"], split="all")
    # samples: VD fig0 q0, VD fig0 q1, VD fig1 q0, VD fig1 q1, VS fig1 q0, VS fig0 q0 (no figure)
    # figure 0 both right; figure 1: q0 right, q1 wrong; VS with figure right; VS without figure wrong
    scores = hallusion_scores(samples, [_result(x, "no") for x in (True, True, True, False, True, False)])
    assert scores["aAcc"] == pytest.approx(100 * 4 / 6)
    # figures: (VD,0,0) right, (VD,0,1) not, (VS,1,1) right; the VS question without a figure is no figure
    # (lmms-eval get_eval_fig skips it), so its wrong answer leaves fAcc at 2/3
    assert (scores["fAcc"], scores["n_fAcc"]) == (pytest.approx(100 * 2 / 3), 3)
    # questions: (VD,0,q0) right on both figures, (VD,0,q1) wrong on figure 1, (VS,1,q0) wrong without figure
    assert (scores["qAcc"], scores["n_qAcc"]) == (pytest.approx(100 * 1 / 3), 3)
    assert scores["accuracy"] == scores["aAcc"]
    # a timeout is neither right nor wrong: left out of aAcc, its figure and question groups unjudged
    scores = hallusion_scores(samples, [_result(x) for x in (None, True, True, True, True, True)])
    assert scores["aAcc"] == 100.0 and scores["n_timeout"] == 1 and scores["n_scored"] == 5
    assert (scores["fAcc"], scores["n_fAcc"]) == (100.0, 2)
    assert (scores["qAcc"], scores["n_qAcc"]) == (100.0, 2)
    empty = hallusion_scores(samples[:1], [_result(None)])
    assert math.isnan(empty["aAcc"]) and math.isnan(empty["fAcc"])


@pytest.mark.parametrize("unclear", ["I cannot tell from the text alone", "", "yes or no"])
def test_hallusion_unclear_counts_right_only_without_a_figure(data, unclear):
    """An answer with no yes/no verdict to a VS question asked without its figure is right (the official
    rule: the model cannot know); the same answer where the figure is given stays wrong. The rule is the
    scorer's, read from the fields the loader gives each sample."""
    hall = get_benchmark("hallusionbench")
    samples = hall.load(data["hallusionbench"], split="all")
    golds = [s.answer.gold for s in samples]
    results = [score("hallusionbench", g, s.fields) for s, g in zip(samples[:4], golds)]
    results += [score("hallusionbench", unclear, s.fields) for s in samples[4:]]
    assert hall.verdicts(samples, results) == [True, True, True, True, False, True]
    # a hedge naming both words is the official rule's leniency: flagged, and wrong in strict mode
    hedge = unclear == "yes or no"
    assert results[5].flagged == hedge
    assert score("hallusionbench", unclear, samples[5].fields, "strict").correct == (not hedge)
    # an explicit wrong answer without the figure stays wrong
    wrong_word = "yes" if golds[5] == "no" else "no"
    for wrong in (wrong_word, "%s, the left line is shorter." % wrong_word.capitalize()):
        assert hall.verdicts(samples, results[:5] + [score("hallusionbench", wrong, samples[5].fields)])[5] is False
    scores = hall.score(samples, results)
    assert scores["aAcc"] == pytest.approx(100 * 5 / 6) and scores["accuracy"] == scores["aAcc"]
    assert hall.breakdown_tables(samples, results)["category"]["VS"]["n_correct"] == 1


def test_schema_errors_name_file_split_and_column(tmp_path, data):
    with pytest.raises(BenchmarkDataError, match="no such file or folder"):
        get_benchmark("mmstar").load(str(tmp_path / "missing"))
    with pytest.raises(BenchmarkDataError, match=r"mathvista \(testmini split\): no parquet file matching"):
        get_benchmark("mathvista").load(str(tmp_path))
    with pytest.raises(BenchmarkDataError, match="unknown split 'train'"):
        get_benchmark("mathvista").load(data["mathvista"], split="train")
    bad = tmp_path / "mmstar.parquet"
    pq.write_table(pa.Table.from_pylist([{"index": 0, "question": "q", "answer": "A"}]), str(bad))
    with pytest.raises(BenchmarkDataError, match=r"mmstar.parquet lacks column\(s\) image"):
        get_benchmark("mmstar").load(str(bad))
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(BenchmarkDataError, match="not a readable parquet file"):
        get_benchmark("mmstar").load(str(not_parquet))
    wrong = tmp_path / "wrong" / "mmstar.parquet"
    eval_fixtures.write(str(wrong), [dict(index=0, question="q", image=eval_fixtures.png(), answer="Z")])
    with pytest.raises(BenchmarkDataError, match="answer 'Z' is not one of the 10 option letters"):
        get_benchmark("mmstar").load(str(wrong))
    corrupt = tmp_path / "corrupt" / "mmstar.parquet"
    eval_fixtures.write(str(corrupt), [dict(index=0, question="q", image={"bytes": b"xx", "path": "a"}, answer="A")])
    (sample,) = get_benchmark("mmstar").load(str(corrupt))  # decoding is lazy: the error comes on use
    with pytest.raises(BenchmarkDataError, match="cannot be decoded"):
        sample.images[0].load()
    with pytest.raises(ValueError, match="benchmark: expected one of"):
        get_benchmark("imagenet")


def test_registry_matches_the_paper():
    assert [b.title for b in BENCHMARKS.values()] == [
        "MathVista",
        "MathVision",
        "MathVerse",
        "MMMU",
        "MMMU-Pro",
        "MMStar",
        "HallusionBench",
    ]
    assert get_benchmark("MMMU-Pro").name == "mmmu_pro"


@pytest.mark.parametrize("name", sorted(eval_fixtures.WRITERS))
def test_every_loaded_sample_carries_what_its_scorer_reads(data, name):
    """The loader puts the columns each scorer reads into the sample's fields: the reference stated in a box is
    right by the benchmark's own rule, unflagged, in both modes, and another option letter is wrong."""
    bench = get_benchmark(name)
    split = "all" if name in ("hallusionbench", "mmmu_pro") else None
    samples = bench.load(data[name], split=split)
    for s in samples:
        for mode in ("official", "strict"):
            result = score(name, "The answer is \\boxed{%s}." % s.answer.gold, s.fields, mode)
            assert (result.status, result.flagged) == ("correct", False), (s.id, mode, result)
        if s.answer.kind == "choice":
            other = "A" if s.answer.gold != "A" else "B"
            assert score(name, "The answer is (%s)." % other, s.fields).status == "incorrect", s.id
        if s.answer.options:  # the options reach the scorer: the right option's text names it
            text = s.answer.options[ord(s.answer.gold) - ord("A")]
            result = score(name, "The answer is %s." % text, s.fields, "strict")
            assert (result.status, result.extracted) == ("correct", s.answer.gold), (s.id, result)
