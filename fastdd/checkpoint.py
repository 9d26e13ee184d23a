"""Atomic checkpoints: write to a temporary file in the same directory, fsync, then rename.

A run killed at any moment leaves either the previous complete checkpoint or the new complete one,
never a truncated file.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

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


def dataset_fingerprint(dataset) -> str:
    """A cheap identity of a dataset: SHA-256 over its labels, image shape and a strided sample of pixels.
    A lazily read image folder (no ``images`` tensor, :func:`fastdd.data.is_lazy`) is identified without
    decoding it: :func:`lazy_fingerprint` (so the same folder read eagerly has another fingerprint)."""
    import hashlib

    from .data import is_lazy

    if is_lazy(dataset):
        return lazy_fingerprint(dataset)
    h = hashlib.sha256()
    images = dataset.images
    h.update(repr((dataset.name, tuple(images.shape), int(dataset.num_classes))).encode())
    h.update(dataset.labels.detach().cpu().to(torch.int64).numpy().tobytes())
    flat = images.detach().reshape(-1)
    step = max(1, flat.numel() // 65536)
    h.update(flat[::step].cpu().to(torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def lazy_fingerprint(dataset, sample: int = 8) -> str:
    """The identity of a lazy image folder: SHA-256 over (name, N, C, H, W, K), its labels, its file paths
    relative to their common folder (the tree may move) and the decoded pixels of ``sample`` evenly spaced
    files; only those files are opened."""
    import hashlib

    n = len(dataset)
    h = hashlib.sha256()
    h.update(repr((dataset.name, n, dataset.channels, tuple(dataset.image_size), int(dataset.num_classes))).encode())
    h.update(dataset.labels.detach().cpu().to(torch.int64).numpy().tobytes())
    paths = [os.fsdecode(p) for p in dataset.files]
    common = os.path.commonpath(paths) if n > 1 else os.path.dirname(paths[0])
    h.update("\n".join(os.path.relpath(p, common) for p in paths).encode("utf-8", "surrogateescape"))
    rows = torch.linspace(0, n - 1, min(sample, n)).round().long().unique()
    h.update(dataset.images_at(rows).numpy().tobytes())
    return h.hexdigest()[:16]


def run_identity(kind: str, name: str, config: dict, dataset) -> dict:
    """What a checkpoint belongs to: command kind, method/run name, config, dataset name and fingerprint,
    image shape ``[C, H, W]`` and fastdd version."""
    from . import __version__

    return {"kind": kind, "name": name, "config": dict(config), "dataset": dataset.name,
            "fingerprint": dataset_fingerprint(dataset), "image_shape": [dataset.channels, *dataset.image_size],
            "fastdd_version": __version__}


def wrap_state(state: Any, identity: dict) -> dict:
    """The payload :func:`save_atomic` writes for a resumable run: the state plus its :func:`run_identity`."""
    return {"fastdd_run": identity, "state": state}


def unwrap_state(payload: Any, identity: dict, path: str | os.PathLike, ignore=("iterations", "epochs"),
                 defaults: Optional[dict] = None) -> Any:
    """The state of a payload from :func:`wrap_state`, refusing one that belongs to another run.

    Config keys named in ``ignore`` may differ (extending a run's length is allowed); ``defaults`` gives the
    value of a config key that an older checkpoint lacks (the value the code of that time used)."""
    from .errors import UsageError

    if not isinstance(payload, dict) or "fastdd_run" not in payload or "state" not in payload:
        raise UsageError(f"{path}: not a fastdd checkpoint of this version (no run identity); rerun with --force")
    saved = payload["fastdd_run"]
    for key in ("kind", "name", "dataset", "fingerprint", "image_shape"):
        if saved.get(key) != identity.get(key):
            raise UsageError(f"{path}: belongs to another run ({key} {saved.get(key)!r}, this run has "
                             f"{identity.get(key)!r}); use another --out or --force")
    new = identity.get("config", {})
    old = {**{k: v for k, v in (defaults or {}).items() if k in new}, **saved.get("config", {})}
    differ = sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))
    if differ:
        k = differ[0]
        raise UsageError(f"{path}: was written with {k}={old.get(k)!r}, this run has {k}={new.get(k)!r}; "
                         f"--resume needs the same options (or use --force)")
    return payload["state"]


def check_run_meta(meta_path: str | os.PathLike, mine: dict, *, what: str, grows: str) -> None:
    """Refuse (``ValueError`` naming the file) to resume the run whose metadata JSON is ``meta_path`` when
    it is damaged, or its dataset / fingerprint or any config field but ``grows`` (a count the run may
    extend) differs from ``mine`` ({"dataset", "fingerprint", "config": {...}}). ``what`` names the config
    in the message. A missing file passes (nothing to resume)."""
    import json

    meta_path = Path(meta_path)
    if not meta_path.exists():
        return
    try:
        saved = json.loads(meta_path.read_text())
        saved_cfg = dict(saved["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{meta_path}: damaged ({type(exc).__name__}: {exc})") from exc
    for key in ("dataset", "fingerprint"):
        if saved.get(key) != mine[key]:
            raise ValueError(f"--resume: {meta_path} belongs to another dataset ({key} {saved.get(key)!r}, this "
                             f"run has {mine[key]!r}); use another --out or --force")
    want = mine["config"]
    differing = sorted(k for k in want if k != grows and saved_cfg.get(k) != want[k])
    if differing:
        detail = ", ".join(f"{k}: {saved_cfg.get(k)!r} vs {want[k]!r}" for k in differing)
        raise ValueError(f"--resume: {what} differs from the one in {meta_path}: {detail}")
