"""``--device`` validation shared by every subcommand: a usable device or a clear :class:`UsageError`."""
from __future__ import annotations

import torch

from .errors import UsageError


def default_device() -> str:
    """``cuda`` where a GPU is usable, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(spec: str, flag: str = "--device") -> torch.device:
    """Parse ``spec`` and make sure it can be used here; never falls back to another device silently."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"{flag}: unknown device {spec!r} (expected cpu, cuda or cuda:N)") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"{flag}: device {spec!r} is not supported (expected cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise UsageError(f"{flag}: {spec!r} requested but no usable CUDA GPU is available (use --device cpu)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UsageError(f"{flag}: {spec!r} requested but this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    return device
