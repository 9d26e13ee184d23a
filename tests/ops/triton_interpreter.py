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
import torch

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


def feature_pair_bad_cases(a: str, b: str, n_a: int, n_b: int, d: int) -> list:
    """(changes, exception, message) cases of ``fastdd.ops._common.check_feature_pair`` and the row labels,
    for an op whose feature inputs ``a`` [n_a, d] and ``b`` [n_b, d] carry labels ``<a>_labels`` and
    ``<b>_labels`` (errors about a mismatch name ``b``)."""
    n_real, n_syn = (n_a, n_b) if a == "real" else (n_b, n_a)
    return [
        (dict(**{a: torch.randn(n_a)}), ValueError, rf"{a}: expected a 2-d"),
        (dict(**{b: torch.randn(n_b, d - 1)}), ValueError, rf"{b}: feature dimension {d - 1} does not match {a}'s {d}"),
        (dict(**{b: torch.randn(n_b, d, dtype=torch.float64)}), TypeError, rf"{b}: dtype"),
        (dict(**{a: torch.randint(0, 3, (n_a, d))}), TypeError, rf"{a}: dtype"),
        (dict(**{b: torch.randn(n_b, d, device="meta")}), ValueError, rf"{b}: on device meta"),
        (dict(real_labels=torch.zeros(n_real)), TypeError, r"real_labels: dtype"),
        (dict(syn_labels=torch.zeros(n_syn - 1, dtype=torch.int64)), ValueError,
         rf"syn_labels: expected shape \({n_syn},\)"),
    ]


def compile_for_gpu(make_specs, monkeypatch, tmp_path) -> None:
    """Ahead-of-time compile of Triton kernels to PTX for sm_90 (no GPU needed): catches what the interpreter
    does not check (types, layouts, constexpr branches). ``make_specs()`` (called once Triton is known to
    compile here) returns (jit function, signature, constexprs) triples."""
    if INTERPRETING_FROM_START or _backend.triton_interpreting():
        pytest.skip("jit functions are interpreted in this process")
    if not _backend.triton_importable():
        pytest.skip("triton not importable")
    import triton
    from triton.compiler import ASTSource

    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:
        pytest.skip("this triton has no GPUTarget")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    target = GPUTarget("cuda", 90, 32)
    for fn, sig, consts in make_specs():
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
        assert compiled.asm.get("ptx"), f"{fn.__name__}: no PTX"


def require_gpu_backend(backend: str, kernel: str) -> None:
    """Skip a GPU test whose ``backend`` cannot run ``kernel`` here (the gpu marker skips it without CUDA)."""
    if not _backend.backend_available(backend, "cuda", kernel):
        pytest.skip(f"backend {backend} not available")
