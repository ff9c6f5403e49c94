"""``deploykit bench``: one measured speed / size / accuracy table across every backend and scheme.

``run_bench(BenchConfig(model=..., out=...))`` converts (or reuses cached artifacts), measures every
row in its own subprocess (``deploykit.bench.worker``), derives ratios against fp32 torch and writes
results.json, results.csv, report.md and report.png. Column meanings: ``deploykit.bench.schema``.
"""
from __future__ import annotations

from .harness import BASELINE, BenchConfig, run_bench
from .schema import COLUMN_NAMES, COLUMNS, SCHEMA_VERSION

__all__ = ["BASELINE", "COLUMNS", "COLUMN_NAMES", "SCHEMA_VERSION", "BenchConfig", "run_bench"]
