"""Deployment: packed checkpoints and their memory model, the inference runtime, its kernels, benchmarks."""
