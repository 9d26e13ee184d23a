"""``torch.compile`` for the hot networks, with a switch and a clean eager fallback; CPU chunk sizing.

The switch (``compile`` field of the method config and of :class:`fastdd.evaluate.EvalConfig`) takes

* ``"off"``: eager PyTorch;
* ``"on"``: compile (an error if no compiler back end is usable on the device);
* ``"auto"`` (default): compile when a back end is usable *and* the run calls the network often enough
  to amortise the compilation (tens of seconds per graph on a CPU): always on CUDA, on a CPU from
  :data:`AUTO_MIN_CALLS` calls. The environment variable ``FASTDD_COMPILE`` (``on`` / ``off``)
  overrides ``"auto"`` only.

Compiled graphs are specialised per input shape (``dynamic=False``) and keep the parameters as graph
inputs, so re-initialising the network in place (DM draws a fresh network every iteration) reuses
the same graph. If compiling or running a compiled graph fails, the call is re-run eagerly; if that
succeeds the wrapper warns once and stays eager from then on (an error the eager code raises as
well, e.g. a wrongly shaped input, propagates unchanged).
"""
from __future__ import annotations

import os
import shutil
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

COMPILE_MODES = ("auto", "on", "off")
#: ``"auto"`` compiles on a CPU only for runs with at least this many calls of the compiled network.
AUTO_MIN_CALLS = 300
_ATTR = "_fastdd_embedder"


def last_level_cache_bytes() -> int:
    """Size in bytes of the largest cache of CPU 0 (Linux sysfs); 32 MiB when it cannot be read."""
    import glob

    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as fh:
                text = fh.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KM")) * scale)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def cache_rows(bytes_per_row: int, lo: int = 32, hi: int = 512) -> int:
    """Rows per CPU chunk: those whose largest activation (``bytes_per_row`` each) fills about twice the
    last-level cache, clamped to [lo, hi] (empirical optimum of the ConvNet forwards, see README)."""
    return int(max(lo, min(hi, 2 * last_level_cache_bytes() // max(1, bytes_per_row))))


def check_compile_mode(value, name: str = "compile") -> str:
    """Return ``value`` if it is one of :data:`COMPILE_MODES`, else raise a ValueError naming ``name``."""
    if not isinstance(value, str) or value not in COMPILE_MODES:
        raise ValueError(f"{name}: expected one of {list(COMPILE_MODES)}, got {value!r}")
    return value


def compiler_available(device) -> Tuple[bool, str]:
    """Whether ``torch.compile``'s inductor back end can build code for ``device``, and why not."""
    device = torch.device(device)
    if not hasattr(torch, "compile"):
        return False, "this torch has no torch.compile"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "triton is not installed"
        return True, ""
    if device.type == "cpu":
        if not any(shutil.which(cc) for cc in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if cc):
            return False, "no C++ compiler on PATH"
        return True, ""
    return False, f"no compile back end for device type {device.type!r}"


def should_compile(mode: str, device, calls: Optional[int] = None) -> bool:
    """Resolve ``mode`` ("auto" | "on" | "off") for a run on ``device`` making about ``calls`` calls."""
    check_compile_mode(mode)
    if mode == "auto":
        env = os.environ.get("FASTDD_COMPILE", "").strip().lower()
        if env in ("on", "off"):
            mode = env
    if mode == "off":
        return False
    ok, why = compiler_available(device)
    if mode == "on":
        if not ok:
            raise RuntimeError(f"compile='on': torch.compile is not usable on {torch.device(device)} ({why})")
        return True
    if not ok:
        return False
    return torch.device(device).type == "cuda" or (calls is not None and calls >= AUTO_MIN_CALLS)


class Compiled:
    """A callable that runs ``torch.compile(fn, dynamic=False, mode=mode)`` or, when disabled or after a
    failure, ``fn`` itself. ``clone_outputs`` copies tensor outputs (needed with CUDA graphs, whose output
    buffers are overwritten by the next replay)."""

    def __init__(self, fn: Callable, enabled: bool, *, mode: Optional[str] = None, clone_outputs: bool = False,
                 name: str = "function"):
        self.fn = fn
        self.name = name
        self.enabled = bool(enabled)
        self.clone_outputs = clone_outputs
        self._compiled = torch.compile(fn, dynamic=False, mode=mode) if self.enabled else None

    def __call__(self, *args):
        if self._compiled is None:
            return self.fn(*args)
        try:
            out = self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 - re-run eagerly; a genuine error is raised again there
            out = self.fn(*args)
            warnings.warn(f"fastdd.compile: compiled {self.name} failed ({type(exc).__name__}: {exc}); "
                          "running eagerly from now on", RuntimeWarning, stacklevel=2)
            self._compiled = None
            self.enabled = False
            return out
        if self.clone_outputs:
            out = _clone(out)
        return out


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone(o) for o in out)
    return out


class Embedder:
    """The embedding of ``net`` (``embed(x) [N, C, H, W] -> [N, F]`` and ``embed_with_taps``), compiled or eager.

    One compiled function per (grad mode, taps) pair; each specialises on the input shape. On CUDA the
    no-grad embedding uses CUDA graphs (``mode="reduce-overhead"``, outputs copied). ``channels_last``
    converts the inputs (the network's parameters should be converted by the caller, e.g.
    ``net.to(memory_format=torch.channels_last)``); results equal the contiguous ones up to fp32 rounding.
    """

    def __init__(self, net: torch.nn.Module, enabled: bool, *, channels_last: bool = False):
        from .models import embed_with_taps

        self.net = net
        self.enabled = bool(enabled)
        self.channels_last = channels_last
        cuda = next(net.parameters()).device.type == "cuda"
        self._fns: Dict[Tuple[bool, bool], Compiled] = {}
        for grad in (False, True):
            mode = "reduce-overhead" if (cuda and not grad) else None
            self._fns[(grad, False)] = Compiled(net.embed, enabled, mode=mode, clone_outputs=mode is not None,
                                                name=f"{type(net).__name__}.embed")
            self._fns[(grad, True)] = Compiled(lambda x: embed_with_taps(net, x), enabled, mode=mode,
                                               clone_outputs=mode is not None,
                                               name=f"{type(net).__name__}.embed_with_taps")

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features [N, F] of images x [N, C, H, W] (autograd follows the current grad mode)."""
        return self._fns[(torch.is_grad_enabled(), False)](self._prep(x))

    def embed_with_taps(self, x: torch.Tensor):
        """``(features [N, F], [per-block maps [N, C_l, H_l, W_l]])``, see :func:`fastdd.models.embed_with_taps`."""
        emb, taps = self._fns[(torch.is_grad_enabled(), True)](self._prep(x))
        return emb, [t.contiguous() for t in taps]


def attach_embedder(net: torch.nn.Module, mode: str, device, calls: Optional[int] = None) -> Embedder:
    """Decide compile / channels_last for ``net`` on ``device`` and register the :class:`Embedder` that
    :func:`embedder_for` returns for it. channels_last is used on CPUs for networks with 2-D convolutions
    (oneDNN's fast layout; the parameters are converted in place of the module's)."""
    device = torch.device(device)
    enabled = should_compile(mode, device, calls)
    cl = device.type == "cpu" and any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    if cl:
        net.to(memory_format=torch.channels_last)
    emb = Embedder(net, enabled, channels_last=cl)
    net.__dict__[_ATTR] = emb  # a plain attribute (a reference cycle the GC collects with the module)
    return emb


def embedder_for(net: torch.nn.Module) -> Optional[Embedder]:
    """The :class:`Embedder` registered for ``net`` by :func:`attach_embedder`, or ``None``."""
    return net.__dict__.get(_ATTR)
