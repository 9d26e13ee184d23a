"""Low-rank image parameterisation (the "efficient dataset condensation plugin", spec section 1).

Every synthetic image plane is a product of two free factors (spec 1.1):

    X[n, c] = A[n, c] @ B[n, c],   A [N, C, H, r],  B [N, C, r, W]  ->  X [N, C, H, W]

Contract
--------
* ``lowrank_reconstruct(A, B) -> X`` in the input dtype; every backend accumulates in fp32 (fp64 for
  fp64 inputs). Backward (spec 1.2): ``dA = dX @ B^T`` [N, C, H, r] and ``dB = A^T @ dX`` [N, C, r, W],
  computed by one fused kernel that reads ``dX`` once: C++ for any r; CUDA for r <= 16 and Triton for
  r <= 32 (fp64: 8), larger ranks being processed in rank chunks that each read ``dX`` once more.
* ``lowrank_project(images, rank) -> (A, B)``: the best rank-r approximation of every (n, c) plane
  (Eckart-Young) from a batched truncated SVD, split symmetrically ``A = U_r sqrt(S_r)``,
  ``B = sqrt(S_r) V_r^T``. ``rank > min(H, W)`` is an error (not clamped: a silently smaller rank would
  change the storage budget); ``rank = min(H, W)`` reproduces the images up to rounding.
* Budget (spec 1.3): :func:`lowrank_ipc` and :func:`lowrank_floats_per_image`.

Backends and registration
-------------------------
===========  ==================  =====================================================================
backend      device              implementation
===========  ==================  =====================================================================
triton       CUDA (CPU interp.)  ``kernels/lowrank.py`` (``fastdd.kernels.lowrank`` or the source tree)
cuda         CUDA                ``csrc/lowrank/lowrank_cuda.cu`` -> ``torch.ops.fastdd_C.lowrank_*``
cpp          CPU                 ``csrc/lowrank/lowrank_cpu.cpp`` (OpenMP) -> ``torch.ops.fastdd_C.lowrank_*``
closed_form  anywhere            ``torch.matmul`` forward with the hand-derived backward in this file
torch        anywhere            :func:`lowrank_reconstruct_reference` differentiated by autograd
===========  ==================  =====================================================================

Registration follows the op-layer rule (``fastdd/ops/README.md``): the backend is resolved in Python by
:func:`fastdd.ops._backend.resolve_backend` (``backend=None`` = automatic or ``FASTDD_BACKEND``);
``torch`` calls the reference, every other backend runs inside one ``torch.library.custom_op`` per
direction (``fastdd::lowrank_reconstruct`` / ``fastdd::lowrank_reconstruct_backward``, with
``register_fake`` and ``register_autograd``). The backward op is not itself differentiable (first-order
gradients only; every method of spec 1.4 differentiates the reconstruction once).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastdd.ops._backend import BackendUnavailableError, declare_closed_form, resolve_backend, triton_kernels
from fastdd.ops._common import FLOAT_DTYPES, acc_dtype, check_backend_name, dispatch
from fastdd.validation import check_tensor

__all__ = [
    "lowrank_reconstruct",
    "lowrank_reconstruct_reference",
    "lowrank_project",
    "lowrank_ipc",
    "lowrank_floats_per_image",
    "validate_factors",
    "BackendUnavailableError",
    "ROUNDINGS",
]

_OP = "lowrank_fwd"  # native kernel whose presence makes cpp / cuda available
ROUNDINGS = ("code", "readme")
declare_closed_form(_OP)

# ------------------------------------------------------------------------------------------ reference
def lowrank_reconstruct_reference(factor_a: Tensor, factor_b: Tensor) -> Tensor:
    """Plain-torch spec: ``X = A @ B`` per (n, c) plane, accumulated in fp32 (fp64 for fp64), returned in
    the input dtype; differentiable by autograd. A [N, C, H, r], B [N, C, r, W] -> X [N, C, H, W]."""
    acc = acc_dtype(factor_a.dtype)
    return torch.matmul(factor_a.to(acc), factor_b.to(acc)).to(factor_a.dtype)


def _torch_backward(grad: Tensor, a: Tensor, b: Tensor, need_a: bool, need_b: bool) -> Tuple[Tensor, Tensor]:
    acc = acc_dtype(a.dtype)
    g = grad.to(acc)
    ga = (g @ b.to(acc).transpose(-1, -2)).to(a.dtype) if need_a else a.new_empty((0,))
    gb = (a.to(acc).transpose(-1, -2) @ g).to(b.dtype) if need_b else b.new_empty((0,))
    return ga, gb


# --------------------------------------------------------------------------------------------- backends
def _triton():
    return triton_kernels("lowrank")


def _native_fwd(a: Tensor, b: Tensor) -> Tensor:
    return torch.ops.fastdd_C.lowrank_fwd(a, b)


def _native_bwd(grad: Tensor, a: Tensor, b: Tensor, need_a: bool, need_b: bool):
    return tuple(torch.ops.fastdd_C.lowrank_bwd(grad, a, b, need_a, need_b))


_FWD = {"cpp": _native_fwd, "cuda": _native_fwd, "closed_form": lowrank_reconstruct_reference,
        "triton": lambda a, b: _triton().lowrank_forward(a, b)}
_BWD = {"cpp": _native_bwd, "cuda": _native_bwd, "closed_form": _torch_backward,
        "triton": lambda *args: _triton().lowrank_backward(*args)}


# ------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastdd::lowrank_reconstruct", mutates_args=())
def _reconstruct_op(factor_a: Tensor, factor_b: Tensor, backend: str) -> Tensor:
    """X [N, C, H, W] = A [N, C, H, r] @ B [N, C, r, W] in A's dtype (``backend`` already resolved)."""
    return dispatch(_FWD, backend, "lowrank_reconstruct")(factor_a, factor_b)


@_reconstruct_op.register_fake
def _(factor_a, factor_b, backend):
    n, c, h, _ = factor_a.shape
    return factor_a.new_empty((n, c, h, factor_b.shape[3]))


@torch.library.custom_op("fastdd::lowrank_reconstruct_backward", mutates_args=())
def _reconstruct_backward_op(grad: Tensor, factor_a: Tensor, factor_b: Tensor, need_a: bool, need_b: bool,
                             backend: str) -> Tuple[Tensor, Tensor]:
    """(dA [N, C, H, r] or [0], dB [N, C, r, W] or [0]) from one read of grad [N, C, H, W]."""
    ga, gb = dispatch(_BWD, backend, "lowrank_reconstruct_backward")(grad, factor_a, factor_b, need_a, need_b)
    return ga, gb


@_reconstruct_backward_op.register_fake
def _(grad, factor_a, factor_b, need_a, need_b, backend):
    return (factor_a.new_empty(factor_a.shape if need_a else (0,)),
            factor_b.new_empty(factor_b.shape if need_b else (0,)))


def _setup(ctx, inputs, output):
    factor_a, factor_b, backend = inputs
    ctx.save_for_backward(factor_a, factor_b)
    ctx.backend = backend


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_a or need_b):
        return None, None, None
    ga, gb = torch.ops.fastdd.lowrank_reconstruct_backward(grad.contiguous(), a, b, need_a, need_b, ctx.backend)
    return (ga if need_a else None), (gb if need_b else None), None


_reconstruct_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------- validation
def validate_factors(factor_a, factor_b, *, check_finite: bool = False) -> None:
    """Raise a ``TypeError`` / ``ValueError`` naming the bad argument: both 4-d floating tensors of one
    dtype and device, A [N, C, H, r] and B [N, C, r, W] with matching N, C and r >= 1. Static checks are
    compile-safe; ``check_finite`` (eager only, a host sync) also rejects NaN/Inf."""
    for name, t, layout in (("factor_a", factor_a, "[N, C, H, r]"), ("factor_b", factor_b, "[N, C, r, W]")):
        check_tensor(name, t, ndim=4, layout=layout, dtypes=FLOAT_DTYPES)
    if factor_b.dtype != factor_a.dtype:
        raise TypeError(f"factor_b: dtype {factor_b.dtype} does not match factor_a's {factor_a.dtype}")
    if factor_b.device != factor_a.device:
        raise ValueError(f"factor_b: on device {factor_b.device}, expected factor_a's device {factor_a.device}")
    na, ca, _, ra = factor_a.shape
    nb, cb, rb, _ = factor_b.shape
    if nb != na:
        raise ValueError(f"factor_b: {nb} images (dim 0) do not match factor_a's {na}")
    if cb != ca:
        raise ValueError(f"factor_b: {cb} channels (dim 1) do not match factor_a's {ca}")
    if rb != ra:
        raise ValueError(f"factor_b: rank {rb} (dim 2) does not match factor_a's rank {ra} (dim 3)")
    if ra < 1:
        raise ValueError(f"factor_a: rank (dim 3) must be >= 1, got {ra}")
    if check_finite and not torch.compiler.is_compiling():
        for name, t in (("factor_a", factor_a), ("factor_b", factor_b)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: contains NaN or Inf")


# --------------------------------------------------------------------------------------------- public
def lowrank_reconstruct(factor_a: Tensor, factor_b: Tensor, *, backend: Optional[str] = None,
                        check_finite: bool = False) -> Tensor:
    """``X[n, c] = A[n, c] @ B[n, c]``: A [N, C, H, r], B [N, C, r, W] -> X [N, C, H, W] (A's dtype).

    Differentiable w.r.t. both factors (fused backward: dA = dX B^T and dB = A^T dX from one read of
    dX). ``backend`` forces one implementation (see the module docstring).
    """
    check_backend_name(backend)
    validate_factors(factor_a, factor_b, check_finite=check_finite)
    name = resolve_backend(_OP, factor_a.device.type, backend)
    if name == "torch":
        return lowrank_reconstruct_reference(factor_a, factor_b)
    return torch.ops.fastdd.lowrank_reconstruct(factor_a, factor_b, name)


def lowrank_project(images: Tensor, rank: int) -> Tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors of every (n, c) plane of ``images`` [N, C, H, W] (Frobenius and
    spectral norm, Eckart-Young): (A [N, C, H, r], B [N, C, r, W]) in ``images.dtype`` with
    ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T`` from the thin SVD ``X = U S V^T``.

    Uses ``torch.linalg.svd`` (batched LAPACK gesdd on CPU, cuSOLVER on CUDA): the planes are small
    (<= a few hundred pixels a side), the projection runs once at initialisation and is off the hot path,
    and a full SVD gives the exact optimum (a randomized or power-iteration SVD would only approximate
    it). fp16/bf16 inputs are decomposed in fp32. ``rank > min(H, W)`` raises (no clamping: the rank fixes
    the storage budget); at ``rank = min(H, W)`` ``A @ B`` reproduces the images up to rounding.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images: expected a 4-d tensor [N, C, H, W], got shape {tuple(images.shape)}")
    if images.dtype not in FLOAT_DTYPES:
        raise TypeError(f"images: dtype {images.dtype} not supported, expected one of {FLOAT_DTYPES}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank: expected an int, got {type(rank).__name__}")
    h, w = images.shape[2], images.shape[3]
    if rank < 1:
        raise ValueError(f"rank: must be >= 1, got {rank}")
    if rank > min(h, w):
        raise ValueError(f"rank: {rank} exceeds min(H, W) = {min(h, w)} of the {h}x{w} images")
    if images.numel() == 0:
        raise ValueError(f"images: empty tensor of shape {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images: contains NaN or Inf")
    work = images.to(acc_dtype(images.dtype))
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    root = s[..., :rank].sqrt()
    a = u[..., :rank] * root.unsqueeze(-2)
    b = root.unsqueeze(-1) * vh[..., :rank, :]
    return a.to(images.dtype).contiguous(), b.to(images.dtype).contiguous()


def lowrank_floats_per_image(channels: int, height: int, width: int, rank: int) -> int:
    """Floats stored for one low-rank image: ``C * r * (H + W)`` (spec 1.3; labels not counted)."""
    for name, v in (("channels", channels), ("height", height), ("width", width), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return channels * rank * (height + width)


def lowrank_ipc(ipc: int, height: int, width: int, rank: int, rounding: str = "code") -> int:
    """Low-rank images per class at the storage budget of ``ipc`` full images (spec 1.3).

    rounding="code" (the official scripts): ``ipc * floor(H W / (r (H + W)))``, the ratio floored first.
    rounding="readme" (the README formula): ``floor(ipc H W / (r (H + W)))``. They differ when the
    ratio is not an integer (28x28, r=8: 1 vs 1.75 per IPC; the MNIST r=8 configs use 17 and 88, i.e.
    10 x 1.75 and 50 x 1.75 *rounded*; set those by hand). The channel count cancels. A budget that
    gives 0 images per class raises a ``ValueError`` naming the rank.
    """
    for name, v in (("ipc", ipc), ("height", height), ("width", width), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding: expected one of {ROUNDINGS}, got {rounding!r}")
    full, low = height * width, rank * (height + width)
    n = ipc * (full // low) if rounding == "code" else (ipc * full) // low
    if n < 1:
        raise ValueError(
            f"rank: {rank} is too large for {height}x{width} images at ipc={ipc} ({rounding!r} rounding): one "
            f"low-rank image costs {low} floats per channel, more than the budget allows (0 images per class)")
    return n
