"""Evaluation of quantized models beyond the training loss: per-layer analysis."""
