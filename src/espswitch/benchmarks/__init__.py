"""Benchmarks, run by `espswitch bench esp|e2e` (and bench/*.py): they print side-by-side
ratios measured in one run and write JSON; nothing here is a test."""
