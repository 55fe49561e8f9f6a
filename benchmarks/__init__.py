"""Benchmarks of the project (not installed with it): run them from the repo root with `python -m benchmarks.<name>`."""
