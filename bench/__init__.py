"""Benchmark suite: `python -m bench.run [--quick]` (never part of the tests)."""
