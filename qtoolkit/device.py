"""The `--device` convention: `auto` (CUDA when PyTorch sees a GPU, else the CPU), `cpu`, `cuda`
or `cuda:N`. Every command and library function that runs a model resolves its device here, so the
names, the default and the error are the same everywhere."""

from __future__ import annotations

import re

from qtoolkit.errors import ConfigError, short_repr

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"
_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(name: str, what: str = "--device") -> str:
    """`name` if it is a device name this toolkit accepts, else a ConfigError naming `what`."""
    if not isinstance(name, str) or not _PATTERN.fullmatch(name):
        raise ConfigError(f"{what} must be auto, cpu, cuda or cuda:N, got {short_repr(name)}")
    return name


def resolve_device(name: str = DEFAULT_DEVICE, what: str = "--device"):
    """The torch.device for `name`; `cuda` on a machine without CUDA is a ConfigError."""
    import torch

    check_device(name, what)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what} {name}: PyTorch sees no CUDA device on this machine (use --device cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{what} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


__all__ = ["DEFAULT_DEVICE", "DEVICES", "check_device", "resolve_device"]
