"""Reuse freed large CPU blocks instead of returning them to the kernel (glibc ``malloc``).

glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with a fresh
``mmap`` and unmaps it on free. A ConvNet forward on a CPU allocates activations of tens of MiB on every
call (128 images x 128 channels x 28 x 28 fp32 = 49 MiB for the first layer), so every call pays a
minor page fault and the kernel's zeroing for each 4 KiB page it touches: measured on a 2-core AMD EPYC,
the 1->128-channel first convolution of a 128-image batch took 66 ms with glibc's defaults and 10 ms
with the blocks kept (README, "Where the time goes"). The same faults are the ``sys`` time the
``make demo`` profile showed.

:func:`reuse_freed_memory` switches glibc to serving every allocation from its heap (``M_MMAP_MAX = 0``)
and to never trimming the heap (``M_TRIM_THRESHOLD`` = 2 GiB) for the duration of a ``with`` block, so a
freed activation's pages are reused by the next one; on exit it restores glibc's steady-state limits and
returns the free heap to the kernel (``malloc_trim``). The library's long loops run inside it:
:meth:`fastdd.methods.base.Method.fit` (every ``fastdd distill``), :func:`fastdd.evaluate.evaluate_synset` and
the ``train_stacked*`` trainers, :func:`fastdd.squeeze.squeeze` and :func:`fastdd.relabel.relabel_set`. The switch is the environment variable
``FASTDD_MALLOC``: ``reuse`` (default) or ``system`` (leave glibc alone), read when a block starts
(``FASTDD_MALLOC=system fastdd evaluate ...``). On other C libraries (macOS, musl, Windows) the context does nothing.

The setting is process-wide while the block runs: other threads' allocations also stay on the heap.
Memory freed inside the block is returned at its end, not as soon as it is freed, and the heap can
fragment; the end-to-end benchmarks report the peak resident memory with the block active.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
import threading
from typing import Iterator, Optional

MALLOC_MODES = ("reuse", "system")
ENV = "FASTDD_MALLOC"

# mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes a C int: trim only above 2 GiB of free heap top
# glibc's own steady state, restored on exit: its dynamic mmap threshold rises with every freed mapped block
# up to 32 MiB (64-bit), with the trim threshold at twice that; mmap stays on (default count)
_STEADY_MMAP_THRESHOLD, _STEADY_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 32 << 20, 64 << 20, 65536

_lock = threading.Lock()
_depth = 0


@functools.cache
def _glibc() -> Optional[ctypes.CDLL]:
    """The C library if it is glibc on Linux (it has ``mallopt`` and ``malloc_trim``), else None; looked up
    once (``platform.libc_ver`` reads the interpreter's binary)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
    except (OSError, AttributeError):
        return None
    return libc


def malloc_mode(value: Optional[str] = None) -> str:
    """The allocator mode: ``value`` if given, else ``$FASTDD_MALLOC``, else ``"reuse"``; a ValueError
    naming the source for anything outside :data:`MALLOC_MODES`."""
    source = "malloc" if value is not None else ENV
    mode = value if value is not None else os.environ.get(ENV, "reuse")
    if mode not in MALLOC_MODES:
        raise ValueError(f"{source}: expected one of {list(MALLOC_MODES)}, got {mode!r}")
    return mode


def reuse_active() -> bool:
    """True while a :func:`reuse_freed_memory` block has glibc keeping freed blocks."""
    return _depth > 0


@contextlib.contextmanager
def reuse_freed_memory(mode: Optional[str] = None, release: bool = True) -> Iterator[bool]:
    """Keep freed large blocks on the heap for reuse while the block runs (see the module docstring).

    ``mode``: ``"reuse"`` or ``"system"`` (None: :func:`malloc_mode`). ``release``: return the free heap to
    the kernel on exit (False keeps it for the next block, as a benchmark that alternates fastdd with other
    code does). Yields whether reuse is active. Nested blocks are no-ops; only the outermost one sets and
    restores glibc's limits. On exit glibc gets its steady-state limits back (mmap on, mmap threshold
    32 MiB, trim threshold 64 MiB: where its dynamic threshold ends up), not its start-up 128 KiB, which
    ``mallopt`` cannot restore.
    """
    global _depth
    libc = _glibc() if malloc_mode(mode) == "reuse" else None
    if libc is None:
        yield reuse_active()
        return
    with _lock:
        outermost = _depth == 0
        _depth += 1
        if outermost:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if outermost:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_MMAP_THRESHOLD, _STEADY_MMAP_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _STEADY_TRIM_THRESHOLD)
                if release:
                    libc.malloc_trim(0)
