"""Shared plumbing of the op tests for the Triton backend on a CPU.

Triton 3.x decides when ``triton`` itself is imported whether ``@triton.jit`` functions are interpreted,
so TRITON_INTERPRET cannot be switched on mid-process. Each op test file therefore skips its ``[triton]``
cases in a normal run and executes them in one child pytest started with TRITON_INTERPRET=1
(:func:`run_triton_cases_in_child`); under ``TRITON_INTERPRET=1 pytest ...`` they run in-process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastdd.ops import _backend

INTERPRETING_FROM_START = _backend.triton_interpreting()  # read before anything imports triton


def select_cpu_backend(name: str, has_cpp: bool, op: str) -> str:
    """Body of a parametrised ``cpu_backend`` fixture: skip what cannot run here, return ``name``."""
    if name == "cpp" and not has_cpp:
        pytest.skip(f"fastdd._C not built with the {op} kernels")
    if name == "triton":
        if not INTERPRETING_FROM_START:
            pytest.skip("runs in the TRITON_INTERPRET=1 subprocess (test_triton_interpreter_subprocess)")
        if not _backend.triton_importable():
            pytest.skip("triton not importable")
    return name


def run_triton_cases_in_child(test_file: str) -> None:
    """Run every non-GPU ``triton`` case of ``test_file`` in a child pytest with TRITON_INTERPRET=1."""
    if INTERPRETING_FROM_START:
        pytest.skip("already interpreting: the triton cases ran in this process")
    if not _backend.triton_importable():
        pytest.skip("triton not importable")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("FASTDD_BACKEND", None)
    root = Path(test_file).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q", "-x",
         "-k", "triton and not gpu and not subprocess", "-p", "no:cacheprovider"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary


def spy_resolved_backends(monkeypatch, op: str) -> list:
    """Record every backend name that :func:`fastdd.ops._backend.select_backend` resolves for ``op``."""
    seen = []
    original = _backend.select_backend

    def spy(name, device, backend=None):
        out = original(name, device, backend)
        if name == op:
            seen.append(out)
        return out

    monkeypatch.setattr(_backend, "select_backend", spy)
    return seen


# CPU backends of the ops that have a closed_form backend; OP_BACKENDS run through the custom ops ("torch"
# is the reference under autograd and never does).
CPU_BACKENDS = ["cpp", "closed_form", "torch", "triton"]
OP_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]


def native_kernels(kernel: str):
    """(whether fastdd._C registered ``kernel``, a skipif marker for tests that need it)."""
    has = _backend.native_has_op(kernel)
    return has, pytest.mark.skipif(not has, reason=f"fastdd._C not built with the {kernel} kernel")
