"""Benchmark loaders on tiny files in each release's format; schema errors; HallusionBench's three accuracies."""

import math

import eval_fixtures
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from avar_ops.eval import BENCHMARKS, BenchmarkDataError, get_benchmark, hallusion_scores
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
    star = get_benchmark("mmstar").load(data["mmstar"])
    assert [s.answer.gold for s in star] == ["A", "D"] and "Options: A: red" in star[0].prompt
    assert star[1].fields == {"category": "fine-grained perception", "l2_category": "counting"}


def test_mmmu_and_pro(data):
    samples = get_benchmark("mmmu").load(data["mmmu"])
    assert [s.id for s in samples] == ["validation_Art_1", "validation_Art_2", "validation_Math_3"]
    first, second, open_q = samples
    assert "(A) Baroque\n(B) Gothic\n(C) Modern" in first.prompt and first.answer.gold == "B"
    assert len(first.images) == 1 and len(second.images) == 2
    assert (open_q.answer.kind, open_q.answer.gold, open_q.answer.alternatives) == ("auto", "24", ("24.0",))
    assert "single word" in open_q.prompt
    assert [s.id for s in get_benchmark("mmmu").load(data["mmmu"], split="dev")] == ["dev_Math_9"]
    (pro,) = get_benchmark("mmmu_pro").load(data["mmmu_pro"])  # the vision config next to it is not read
    assert (pro.answer.gold, pro.answer.num_options) == ("J", 10) and "(J) opt9" in pro.prompt


def test_limit(data):
    assert len(get_benchmark("mmmu").load(data["mmmu"], limit=2)) == 2
    with pytest.raises(ValueError, match="limit"):
        get_benchmark("mmmu").load(data["mmmu"], limit=0)


def test_hallusionbench_loads_both_splits(data):
    samples = get_benchmark("hallusionbench").load(data["hallusionbench"])
    assert len(samples) == 5
    assert [s.answer.gold for s in samples] == ["yes", "no", "no", "yes", "yes"]
    assert samples[4].images == [] and len(samples[0].images) == 1
    assert len(get_benchmark("hallusionbench").load(data["hallusionbench"], split="image")) == 4


def _result(ok):
    if ok is None:
        return CheckResult("timeout", None, "full", "text")
    return CheckResult("correct" if ok else "incorrect", "yes", "full", "text")


def test_hallusion_scores_by_hand(data):
    samples = get_benchmark("hallusionbench").load(data["hallusionbench"])
    # figure 0: both right; figure 1: question 0 right, question 1 wrong; text-only: right
    scores = hallusion_scores(samples, [_result(x) for x in (True, True, True, False, True)])
    assert scores["aAcc"] == pytest.approx(100 * 4 / 5)
    # figures: (VD,0,0) all right, (VD,0,1) not, (VS,1,0) right -> 2/3
    assert scores["fAcc"] == pytest.approx(100 * 2 / 3)
    # questions: (VD,0,q0) right on both figures, (VD,0,q1) wrong on figure 1, (VS,1,q0) right -> 2/3
    assert scores["qAcc"] == pytest.approx(100 * 2 / 3)
    assert scores["accuracy"] == scores["aAcc"]
    # a timeout is neither right nor wrong: left out of aAcc, its figure and question groups unjudged
    scores = hallusion_scores(samples, [_result(x) for x in (None, True, True, True, True)])
    assert scores["aAcc"] == 100.0 and scores["n_timeout"] == 1 and scores["n_scored"] == 4
    assert (scores["fAcc"], scores["n_fAcc"]) == (100.0, 2)
    assert (scores["qAcc"], scores["n_qAcc"]) == (100.0, 2)
    empty = hallusion_scores(samples[:1], [_result(None)])
    assert math.isnan(empty["aAcc"]) and math.isnan(empty["fAcc"])


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
