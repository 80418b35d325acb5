"""Benchmarks runnable as ``python -m mpiserve.bench.<name>``; each writes to ``results/``."""
