"""Benchmark evaluation: the paper's seven benchmarks from local parquet releases with each one's protocol
(split, prompt settings, generation limit, per-category fields, seeded subset: `benchmarks`, `parquet_files`),
the run itself with scoring by the shared answer checker and its report (`runner`), an optional judge model for
the benchmarks whose official scoring uses one (`judge`), and the VAS-accuracy correlation across runs
(`correlate`)."""

from avar_ops.eval import correlate, runner
from avar_ops.eval.benchmarks import (
    BENCHMARKS,
    GENERATION_SOURCES,
    PAPER_ORDER,
    REASONING_BUDGET,
    Benchmark,
    Sample,
    accuracy,
    get_benchmark,
    hallusion_scores,
    ids_digest,
    sample_subset,
    verdicts_of,
)
from avar_ops.eval.judge import JUDGED, Judge, JudgeError
from avar_ops.eval.parquet_files import BenchmarkDataError, LazyImage

__all__ = [
    "BENCHMARKS",
    "GENERATION_SOURCES",
    "PAPER_ORDER",
    "REASONING_BUDGET",
    "Benchmark",
    "BenchmarkDataError",
    "LazyImage",
    "Sample",
    "accuracy",
    "get_benchmark",
    "hallusion_scores",
    "verdicts_of",
    "ids_digest",
    "sample_subset",
    "Judge",
    "JudgeError",
    "JUDGED",
    "correlate",
    "runner",
]
