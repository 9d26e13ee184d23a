"""Where datasets live on disk.

A dataset directory is looked for, in this order, under

1. the explicit ``root`` argument (``--data-path`` on the command line): either the dataset directory
   itself or a parent directory that contains one of the dataset's sub-folder names;
2. every directory in the environment variable ``FASTDD_DATA`` (``os.pathsep``-separated parents);
3. ``~/.cache/fastdd`` (resolved with :func:`pathlib.Path.home` at call time, so ``HOME`` counts);
4. the system directories in :data:`SYSTEM_DATA_DIRS` (``/usr/share/datasets``, where Debian's
   ``dataset-fashion-mnist`` package installs Fashion-MNIST).

Only the explicit ``root`` may be the dataset directory itself; the shared parents are only searched
through the dataset's sub-folder names, so that e.g. MNIST files are never mistaken for Fashion-MNIST
(both use the same file names).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

#: Environment variable holding extra parent directories (``os.pathsep``-separated).
ENV_VAR = "FASTDD_DATA"

#: System-wide parent directories searched last. Tests monkeypatch this constant.
SYSTEM_DATA_DIRS: Tuple[str, ...] = ("/usr/share/datasets",)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset (or one of its files) could not be found on disk.

    ``dataset`` is the canonical dataset name and ``searched`` the directories that were tried, in order.
    """

    def __init__(self, message: str, *, dataset: Optional[str] = None, searched: Sequence[str] = ()):
        super().__init__(message)
        self.dataset = dataset
        self.searched = list(searched)

    def __str__(self) -> str:  # FileNotFoundError's default str() would show errno fields
        return self.args[0]


def user_cache_dir() -> Path:
    """``~/.cache/fastdd`` for the current ``HOME``."""
    return Path.home() / ".cache" / "fastdd"


def search_parents(root: Optional[PathLike] = None) -> List[Tuple[Path, str]]:
    """The parent directories searched for datasets, in priority order, each with its origin.

    Returns a list of ``(directory, origin)`` where origin is one of ``"root"``, ``"FASTDD_DATA"``,
    ``"cache"`` or ``"system"``. Directories need not exist.
    """
    out: List[Tuple[Path, str]] = []
    if root is not None:
        out.append((Path(root).expanduser(), "root"))
    for part in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if part.strip():
            out.append((Path(part.strip()).expanduser(), ENV_VAR))
    out.append((user_cache_dir(), "cache"))
    for d in SYSTEM_DATA_DIRS:
        out.append((Path(d), "system"))
    return out


def candidate_dirs(subdirs: Sequence[str], root: Optional[PathLike] = None) -> List[Path]:
    """Every directory that :func:`find_dataset_dir` would test, in order (for messages and tests)."""
    out: List[Path] = []
    for parent, origin in search_parents(root):
        if origin == "root":
            out.append(parent)
            out.extend(parent / s for s in (*subdirs, "raw"))
        else:
            out.extend(parent / s for s in subdirs)
    return out


def find_dataset_dir(
    dataset: str,
    subdirs: Sequence[str],
    is_dataset_dir: Callable[[Path], bool],
    root: Optional[PathLike] = None,
    hint: str = "",
) -> Path:
    """Return the first directory that holds ``dataset``.

    ``subdirs`` are the sub-folder names (relative to a parent, may contain ``/``) the dataset may use;
    ``is_dataset_dir(path)`` tells whether a directory contains the dataset's files. Raises
    :class:`DatasetNotFoundError` listing every directory tried and how to fix it.
    """
    tried = candidate_dirs(subdirs, root)
    for d in tried:
        try:
            if d.is_dir() and is_dataset_dir(d):
                return d
        except OSError:  # unreadable directory: keep looking
            continue
    lines = "\n".join(f"  {d}" for d in tried)
    msg = (
        f"dataset '{dataset}' was not found. Directories searched, in order:\n{lines}\n"
        f"Fix: pass the dataset directory (or a parent of one of {', '.join(subdirs)}) with --data-path "
        f"(root=... in Python), or set {ENV_VAR} to a parent directory "
        f"({os.pathsep}-separated for several), or place it under {user_cache_dir()}."
    )
    if hint:
        msg += f"\n{hint}"
    raise DatasetNotFoundError(msg, dataset=dataset, searched=[str(d) for d in tried])
