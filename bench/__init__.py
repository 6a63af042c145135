"""Benchmarks: what the service costs and how fast it runs, measured, never assumed."""
