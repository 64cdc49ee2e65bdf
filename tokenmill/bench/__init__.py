"""Benchmarks: machine ceilings, the engine's own speed, and load generation against servers."""
