"""Backend choice for fastdd's fused ops.

Every op has up to five implementations:

===========  ===========================================  =============================================
backend      where it runs                                source
===========  ===========================================  =============================================
triton       CUDA tensors (CPU under TRITON_INTERPRET=1)   ``kernels/<op>.py``
cuda         CUDA tensors                                  ``csrc/<op>/*.cu``
cpp          CPU tensors                                   ``csrc/<op>/*.cpp`` (OpenMP)
closed_form  anywhere (ops that declare one)               ``fastdd/ops/<op>.py``: torch forward with the
                                                           hand-derived backward, inside the custom op
torch        anywhere                                      ``fastdd/ops/<op>.py``: the plain reference,
                                                           differentiated by autograd (no custom op)
===========  ===========================================  =============================================

Automatic choice: CUDA -> triton, else cuda, else closed_form, else torch; CPU -> cpp, else closed_form,
else torch (triton on the CPU only when the Triton interpreter is switched on *and* it is asked for by
name). ``FASTDD_BACKEND=<name>`` forces one backend for every op; asking by name for a backend that cannot
run raises :class:`BackendUnavailableError`, while an automatic choice that has to fall back says so once
(a ``RuntimeWarning``). :func:`resolve_backend` is what the ops call, in Python, before their custom op:
it is a constant under ``torch.compile``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings
from typing import Optional

import torch

BACKENDS = ("triton", "cuda", "cpp", "closed_form", "torch")
ENV_VAR = "FASTDD_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run on this machine / device."""


@functools.cache
def native_module():
    """The compiled extension ``fastdd._C`` or ``None`` when it was not built."""
    try:
        return importlib.import_module("fastdd._C")
    except ImportError:
        return None


def native_has_op(op: str) -> bool:
    """True when ``fastdd._C`` is loaded and registered ``torch.ops.fastdd_C.<op>``."""
    if native_module() is None:
        return False
    return hasattr(torch.ops.fastdd_C, op)


def native_has_cuda() -> bool:
    """True when the extension was compiled with its CUDA sources."""
    mod = native_module()
    return bool(mod is not None and getattr(mod, "with_cuda", lambda: False)())


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


_CLOSED_FORM_OPS: set = set()


def declare_closed_form(op: str) -> None:
    """Record that ``op`` has a ``closed_form`` backend (torch forward + hand-derived backward)."""
    _CLOSED_FORM_OPS.add(op)


def backend_available(backend: str, device_type: str, op: str) -> bool:
    """Whether ``backend`` can run ``op`` on tensors of ``device_type`` ("cpu" or "cuda")."""
    if backend == "torch":
        return True
    if backend == "closed_form":
        return op in _CLOSED_FORM_OPS
    if backend == "cpp":
        return device_type == "cpu" and native_has_op(op)
    if backend == "cuda":
        return device_type == "cuda" and native_has_cuda() and native_has_op(op)
    if backend == "triton":
        if not triton_importable():
            return False
        return device_type == "cuda" or (device_type == "cpu" and triton_interpreting())
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.cache
def _load_triton_kernels(op: str, interpret: bool):
    path = None
    try:
        spec = importlib.util.find_spec(f"fastdd.kernels.{op}")
        path = spec.origin if spec is not None else None
    except ImportError:
        path = None
    if path is None:
        path = os.path.join(_REPO_ROOT, "kernels", f"{op}.py")
        if not os.path.exists(path):
            raise BackendUnavailableError(
                f"backend 'triton': kernels/{op}.py not found (neither fastdd.kernels nor a source tree)")
    name = f"fastdd.kernels.{op}" + ("_interpreted" if interpret else "")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def triton_kernels(op: str):
    """The Triton kernel module of ``op`` (``fastdd.kernels.<op>`` when installed, else
    ``<repo>/kernels/<op>.py``), loaded once per TRITON_INTERPRET setting: ``@triton.jit`` reads the
    interpreter switch when the module is executed, so each setting needs its own module object."""
    return _load_triton_kernels(op, triton_interpreting())


_warned: set = set()


def requested_backend() -> Optional[str]:
    """The backend forced through ``FASTDD_BACKEND``, or ``None`` for automatic choice."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise BackendUnavailableError(f"{ENV_VAR}={value!r} is not one of {BACKENDS} (or 'auto')")
    return value


def select_backend(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """Pick the implementation of ``op`` for tensors on ``device``.

    ``backend`` (an explicit argument) wins over ``FASTDD_BACKEND``; both raise when the named backend
    cannot run. Otherwise the automatic order applies and a fallback is reported once per (op, device).
    """
    device_type = torch.device(device).type
    forced = backend if backend not in (None, "auto") else requested_backend()
    if forced is not None:
        if forced not in BACKENDS:
            raise BackendUnavailableError(f"backend {forced!r} is not one of {BACKENDS}")
        if not backend_available(forced, device_type, op):
            raise BackendUnavailableError(
                f"backend {forced!r} was requested for op {op!r} on {device_type} but is not available "
                f"(built extension: {native_module() is not None}, CUDA kernels: {native_has_cuda()}, "
                f"triton importable: {triton_importable()}, TRITON_INTERPRET: {triton_interpreting()})"
            )
        return forced
    order = ("triton", "cuda", "closed_form", "torch") if device_type == "cuda" else ("cpp", "closed_form", "torch")
    for candidate in order:
        if backend_available(candidate, device_type, op):
            if candidate != order[0]:
                key = (op, device_type)
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(
                        f"fastdd: op {op!r} on {device_type}: backend {order[0]!r} unavailable, using "
                        f"{candidate!r}", RuntimeWarning, stacklevel=3,
                    )
            return candidate
    return "torch"


@torch.compiler.assume_constant_result
def resolve_backend(op: str, device_type: str, backend: Optional[str] = None) -> str:
    """:func:`select_backend` for tensors on ``device_type``, as the ops call it before their custom op.

    A constant under ``torch.compile``: the choice is made once per call site at trace time (changing
    ``FASTDD_BACKEND`` afterwards does not retrace)."""
    return select_backend(op, torch.device(device_type), backend)
