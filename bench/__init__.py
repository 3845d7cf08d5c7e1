"""Benchmarks: each module is a command (python -m bench.<name>) that prints a table and writes JSON."""
