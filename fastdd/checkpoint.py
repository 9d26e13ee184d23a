"""Atomic checkpoints: write to a temporary file in the same directory, fsync, then rename.

A run killed at any moment leaves either the previous complete checkpoint or the new complete one,
never a truncated file.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load(path: str | os.PathLike) -> Any:
    """Load a file written by :func:`save_atomic` (CPU tensors, safe unpickler).

    A missing, empty, truncated or foreign file raises :class:`fastdd.errors.UsageError` naming it.
    """
    from .errors import UsageError

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: does not exist")
    if path.stat().st_size == 0:
        raise UsageError(f"{path}: is empty (damaged file; delete it or rerun with --force)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{path}: damaged or not a fastdd file ({type(exc).__name__}: {reason[:120]})") from exc


def clean_stale_tmp(directory: str | os.PathLike) -> list:
    """Remove the ``.NAME.*.tmp`` leftovers of atomic writes killed mid-way in ``directory``."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for tmp in directory.glob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink()
                removed.append(tmp)
    return removed
