"""Helpers shared by every op module in :mod:`fastdd.ops` (dtype rules and backend-name checks).

Rules (see ``fastdd/ops/README.md``): inputs may be float16 / bfloat16 / float32 / float64; every backend
accumulates in float32, or float64 for float64 inputs (:func:`acc_dtype`).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..validation import check_tensor
from ._backend import BACKENDS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of an op on ``dtype`` inputs: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_features(name: str, x, *, nonempty: bool = False) -> None:
    """Raise a ``TypeError`` / ``ValueError`` naming ``name`` unless ``x`` is a 2-d floating tensor [N, D]
    (with ``nonempty``: at least one row and one feature)."""
    check_tensor(name, x, ndim=2, layout="[N, D]", dtypes=FLOAT_DTYPES)
    if nonempty and (x.shape[0] == 0 or x.shape[1] == 0):
        raise ValueError(f"{name}: expected at least one row and one feature, got shape {tuple(x.shape)}")


def check_feature_pair(a_name: str, a, b_name: str, b, *, nonempty: bool = False) -> None:
    """:func:`check_features` for both, then ``b`` must match ``a``'s feature dimension, device and dtype
    (the errors name ``b``)."""
    check_features(a_name, a, nonempty=nonempty)
    check_features(b_name, b, nonempty=nonempty)
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"{b_name}: feature dimension {b.shape[1]} does not match {a_name}'s {a.shape[1]}")
    if b.device != a.device:
        raise ValueError(f"{b_name}: on device {b.device}, expected {a_name}'s device {a.device}")
    if b.dtype != a.dtype:
        raise TypeError(f"{b_name}: dtype {b.dtype} does not match {a_name}'s {a.dtype}")


def channels_last_only(x: torch.Tensor) -> bool:
    """Whether the 4-d x [N, C, H, W] is stored channels_last and not also NCHW-contiguous (C or H*W of 1): the
    layout the ops read in place with their channels_last paths."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def check_backend_name(backend: Optional[str]) -> None:
    """Raise a ``ValueError`` naming ``backend`` unless it is None, 'auto' or one of :data:`BACKENDS`."""
    if backend is not None and backend != "auto" and backend not in BACKENDS:
        names = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"backend: expected None, 'auto' or one of {names}, got {backend!r}")


def dispatch(table: dict, backend: str, op: str):
    """The implementation of ``op`` for the resolved ``backend`` from ``table`` (backend -> callable)."""
    try:
        return table[backend]
    except KeyError:
        raise ValueError(f"op {op!r} has no {backend!r} implementation inside its custom op "
                         f"(expected one of {sorted(table)})") from None
