"""Benchmark evaluation: the paper's seven benchmarks from local parquet releases, scoring with the shared
answer checker, and the VAS-accuracy correlation across runs."""

from avar_ops.analysis.evaluation.benchmarks import (
    BENCHMARKS,
    PAPER_ORDER,
    Benchmark,
    Sample,
    accuracy,
    get_benchmark,
    hallusion_scores,
)
from avar_ops.analysis.evaluation.parquet_files import BenchmarkDataError, LazyImage

__all__ = [
    "BENCHMARKS",
    "PAPER_ORDER",
    "Benchmark",
    "BenchmarkDataError",
    "LazyImage",
    "Sample",
    "accuracy",
    "get_benchmark",
    "hallusion_scores",
]
