"""Benchmarks: scripts that time one part against a baseline run in the same process.

Each prints a table and writes JSON (``python -m pipeline.bench.<name> --help``); the numbers
worth keeping go to ``BENCHMARKS.md`` with the command that reproduces them.
"""
