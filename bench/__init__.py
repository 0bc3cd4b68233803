"""Benchmarks of the kernels, the training step and the loader."""
