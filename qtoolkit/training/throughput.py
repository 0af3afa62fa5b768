"""Training throughput as model FLOPs utilization (MFU): the fraction of the device's peak that the
model's arithmetic would use at the measured tokens/s.

    flops per token = 6 N + 12 L d T

N counts the parameters that multiply activations (every weight except the input embedding's lookup
table; the output layer counts, tied or not): each takes 2 FLOPs per token forward and 4 backward.
The second term is attention's QK^T and AV products, 2 * 2 * T * d per layer forward and twice that
backward (PaLM's appendix B; causal masking not subtracted, as there). Recomputation by activation
checkpointing and the chunked loss is not counted: MFU, not hardware utilization.

The peak is the dense bf16 tensor-core figure of the GPU (the trainer runs under bf16 autocast on
CUDA), from a small table of datasheet values matched on `torch.cuda.get_device_name()`; any other
device, the CPU included, has no known peak and its MFU is reported as unknown (None).
"""

from __future__ import annotations

import torch
from torch import nn

# (substring of the device name, dense bf16 TFLOP/s); the first match wins, so specific names first
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of `model` at context `seq_len` (module docstring)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())  # a tied weight once
    if not cfg.tie_embeddings:
        n -= model.embed.weight.numel()
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def peak_flops(device: torch.device | str) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, device name) of a CUDA device from the table; (None, name) otherwise."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, "cpu" if device.type == "cpu" else device.type
    name = torch.cuda.get_device_name(device)
    return peak_for_name(name), name


def peak_for_name(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def mfu(tokens_per_s: float, per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1], or None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s * per_token / peak


__all__ = ["PEAK_BF16_TFLOPS", "flops_per_token", "mfu", "peak_flops", "peak_for_name"]
