"""The torch device a `--device` setting names, for training, evaluation, sweeps and benchmarks
(its own module so that evaluation does not import the trainer)."""
from __future__ import annotations

import torch


class DeviceError(RuntimeError):
    """The device asked for is not there (one-line message)."""


def resolve_device(name: str) -> torch.device:
    """name "auto": a CUDA GPU when one is visible, else the CPU; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA GPU is visible")
    return torch.device(name)
