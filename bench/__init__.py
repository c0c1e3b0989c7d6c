"""Serving benchmarks: `python -m bench` (or `make bench`) measures, compares and writes a report."""
