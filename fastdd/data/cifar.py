"""CIFAR-10 / CIFAR-100 "python version" pickles.

CIFAR-10 (``cifar-10-batches-py/``): ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each a dict
with ``b'data'`` (uint8 [N, 3072], three 32x32 planes R, G, B) and ``b'labels'``; ``batches.meta`` holds
``b'label_names'``. CIFAR-100 (``cifar-100-python/``): ``train``, ``test`` with ``b'fine_labels'``;
``meta`` holds ``b'fine_label_names'``.

These files are pickles: only load them from a source you trust (unpickling can run code).
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np

from .paths import DatasetNotFoundError


class CIFARFormatError(ValueError):
    """A CIFAR pickle does not have the expected keys or shapes."""


def _load_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: missing CIFAR file")
    with open(path, "rb") as f:
        try:
            obj = pickle.load(f, encoding="bytes")
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a format error here
            raise CIFARFormatError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CIFARFormatError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _get(d: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise CIFARFormatError(f"{path}: missing key {key!r} (has {sorted(map(repr, d))})")


def _decode(names) -> List[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _read_batch(path: Path, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    d = _load_pickle(path)
    data = np.asarray(_get(d, "data", path))
    labels = np.asarray(_get(d, label_key, path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CIFARFormatError(f"{path}: expected uint8 data [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise CIFARFormatError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def is_cifar10_dir(directory: Path) -> bool:
    """True when ``directory`` looks like ``cifar-10-batches-py``."""
    return (directory / "data_batch_1").is_file() or (directory / "test_batch").is_file()


def is_cifar100_dir(directory: Path) -> bool:
    """True when ``directory`` looks like ``cifar-100-python``."""
    return (directory / "meta").is_file() and ((directory / "train").is_file() or (directory / "test").is_file())


def read_cifar10(directory: Path, split: str) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Read a CIFAR-10 split: ``(images uint8 [N, 3, 32, 32], labels int64 [N], class names)``.

    The train split concatenates every ``data_batch_<k>`` present, in increasing k.
    """
    directory = Path(directory)
    if split == "train":
        files = sorted(
            (p for p in directory.glob("data_batch_*") if re.fullmatch(r"data_batch_\d+", p.name)),
            key=lambda p: int(p.name.rsplit("_", 1)[1]),
        )
        if not files:
            raise DatasetNotFoundError(f"{directory}: no data_batch_<k> files for the CIFAR-10 train split")
    else:
        files = [directory / "test_batch"]
    parts = [_read_batch(p, "labels") for p in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    meta = directory / "batches.meta"
    names = _decode(_get(_load_pickle(meta), "label_names", meta)) if meta.is_file() else [str(i) for i in range(10)]
    return images, labels, names


def read_cifar100(directory: Path, split: str) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Read a CIFAR-100 split (fine labels): ``(images uint8 [N, 3, 32, 32], labels int64 [N], names)``."""
    directory = Path(directory)
    images, labels = _read_batch(directory / split, "fine_labels")
    meta = directory / "meta"
    names = _decode(_get(_load_pickle(meta), "fine_label_names", meta)) if meta.is_file() else [str(i) for i in range(100)]
    return images, labels, names
