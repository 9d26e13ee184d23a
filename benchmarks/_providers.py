"""Benchmark providers that each live in their own process, and interleaved timing of providers.

A provider is a zero-argument callable running one unit of work (an iteration). :class:`ProcessProvider`
builds it in a spawned process from a module-level ``factory(*args)``, so that each provider has the
allocator state its own program would have: fastdd keeps freed blocks on glibc's heap while its loops
run (:mod:`fastdd.allocator`), which, in a shared process, would also speed up a reference's allocations.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from _harness import peak_memory, sync

from fastdd.allocator import reuse_freed_memory


def in_fit(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` run as ``Method.fit`` runs it: with freed large blocks kept for reuse
    (:func:`fastdd.allocator.reuse_freed_memory`), the heap kept between calls."""
    def run():
        with reuse_freed_memory(release=False):
            return step()
    return run


def _worker(conn, factory: Callable, args: tuple, device: str, threads: int) -> None:
    """Serve ``factory(*args)`` in this process: ``"call"`` runs it once, ``"peak"`` measures one call's
    peak memory, ``"stop"`` ends; every reply is ``(ok, value)``."""
    torch.set_num_threads(threads)
    try:
        fn = factory(*args)
        conn.send((True, None))
        while True:
            cmd = conn.recv()
            if cmd == "stop":
                break
            if cmd == "call":
                fn()
                sync(device)
                conn.send((True, None))
            elif cmd == "peak":
                conn.send((True, peak_memory(fn, device)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        import traceback

        conn.send((False, f"{factory.__name__}{args}: {exc!r}\n{traceback.format_exc()}"))


class ProcessProvider:
    """The provider ``factory(*args)`` (a module-level function returning a zero-argument callable) built
    in its own spawned process with this process's torch thread count. Calling it runs one call there and
    blocks until it is done (a pipe round trip of well under a millisecond)."""

    def __init__(self, factory: Callable, args: tuple, device):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, factory, tuple(args), str(device),
                                                      torch.get_num_threads()), daemon=True)
        self.proc.start()
        self._reply()

    def _reply(self):
        ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(f"benchmark worker failed: {value}")
        return value

    def __call__(self) -> None:
        self.conn.send("call")
        self._reply()

    def peak_memory(self) -> tuple:
        self.conn.send("peak")
        return self._reply()

    def close(self) -> None:
        self.conn.send("stop")
        self.proc.join(timeout=60)


def interleaved(calls: dict, device, repeats: int, warmup: int = 2, outputs: Optional[dict] = None) -> dict:
    """Times (ms) of every call, taken in turn (A, B, C, A, B, C, ...) after ``warmup`` rounds; with
    ``outputs`` ({name: list}), each timed call's return value is appended to its list."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    sync(device)
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
            if outputs is not None:
                outputs[k].append(out)
    return times
