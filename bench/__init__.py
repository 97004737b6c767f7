"""Benchmarks that print comparable ratios (not part of the installed package)."""
