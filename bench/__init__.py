"""Benchmarks: rerunnable commands (``python -m bench.transfer|callbacks|e2e``), not timed unit tests."""
