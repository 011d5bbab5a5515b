"""Benchmarks that drive mlgate, as a separate process, against real dependencies."""
