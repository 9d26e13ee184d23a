"""Argument checks shared by every layer.

Each check raises a ``ValueError`` (or ``TypeError`` for a wrong type) whose message starts with the
name of the offending argument, so bad input is reported where it enters instead of deep in a kernel.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch


def check_tensor(
    name: str,
    value,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    finite: bool = False,
    nonempty: bool = False,
    layout: str = "",
) -> torch.Tensor:
    """Validate ``value`` and return it.

    ``shape`` entries that are ``None`` match any size. ``finite=True`` rejects NaN/Inf (floating only).
    ``layout`` (e.g. ``"[N, D]"``) is named in the message of a wrong ``ndim``.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        layout = f" {layout}" if layout else ""
        raise ValueError(f"{name}: expected a {ndim}-d tensor{layout}, got shape {tuple(value.shape)}")
    if shape is not None:
        if value.dim() != len(shape) or any(
            want is not None and got != want for got, want in zip(value.shape, shape)
        ):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name}: expected shape {want}, got {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            raise TypeError(f"{name}: dtype {value.dtype} not supported, expected one of {dtypes}")
    if device is not None and value.device != torch.device(device):
        raise ValueError(f"{name}: on device {value.device}, expected {device}")
    if nonempty and value.numel() == 0:
        raise ValueError(f"{name}: is empty")
    if finite and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return value


def check_labels(name: str, labels: torch.Tensor, num_classes: int, length: Optional[int] = None) -> torch.Tensor:
    """Validate an integer label vector with values in ``[0, num_classes)``."""
    check_tensor(name, labels, ndim=1, dtypes=(torch.int64, torch.int32))
    if length is not None and labels.shape[0] != length:
        raise ValueError(f"{name}: expected {length} labels, got {labels.shape[0]}")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name}: labels must lie in [0, {num_classes}), found range [{lo}, {hi}]")
    return labels


def check_positive_int(name: str, value, *, minimum: int = 1) -> int:
    """Validate an integer option that must be at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value


def check_row_labels(name: str, labels, n: int, device) -> None:
    """Static (compile-safe) checks of a label vector for the rows of a feature tensor: a 1-d int64/int32
    tensor of length ``n`` on ``device``; raises naming ``name``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: dtype {labels.dtype} not supported, expected torch.int64 or torch.int32")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) (one label per row), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name}: on device {labels.device}, expected {device} (the features' device)")
