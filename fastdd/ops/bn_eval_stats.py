"""Eval-mode BatchNorm fused with the batch statistics of its input (SRe2L / DWA recover).

For x [N, C, H, W] and per-channel ``scale``, ``shift`` [C] (an eval BatchNorm folded:
scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale, :func:`eval_affine`):

    y[n,c,h,w] = scale[c] * x[n,c,h,w] + shift[c]
    mean[c] = (1/M) sum_{n,h,w} x[n,c,h,w],   var[c] = (1/M) sum_{n,h,w} (x[n,c,h,w] - mean[c])^2,   M = N*H*W

The recover loss needs both: y feeds the next layer, (mean, var) the BN-statistics term. Run separately
that is the BatchNorm pass plus a statistics pass over x, and in the backward the BatchNorm gradient, the
statistics' gradient and autograd's add of the two (three passes over [N, C, H, W] tensors). Fused, the
forward reads x once and writes y once, and the backward is one pass:

    dx = (c0[c] + c1[c] * x) + scale[c] * gy,   c1 = 2 g_var / M,   c0 = g_mean / M - c1 * mean

(dscale = sum gy * x and dshift = sum gy over (N, H, W), only when asked for: a frozen teacher does not.)
y and dx keep x's layout: channels_last stays channels_last (how a CPU teacher runs, ``memory_format`` of
:mod:`fastdd.methods.recover`), anything else is made NCHW-contiguous. Statistics are float32 (float64 for
float64 x).

Backends (``fastdd/ops/README.md``)
-------------------------------------
===========  ==================  =====================================================================
backend      device              implementation
===========  ==================  =====================================================================
triton       CUDA (CPU interp.)  ``kernels/bn_eval_stats.py``: [rows x channels] tiles in either layout,
                                 fp32 tile sums added in float64 (fp16 / bf16 / fp32; fp64 takes
                                 ``closed_form``)
cpp          CPU                 ``csrc/bn_eval_stats/bn_eval_stats_cpu.cpp`` (OpenMP, deterministic:
                                 fixed row blocks reduced in double; float32 / float64, other dtypes
                                 take ``closed_form``)
closed_form  anywhere            ATen ``addcmul`` forward + ``var_mean``, the hand-derived backward as
                                 two ``addcmul`` passes (no CUDA C++ kernel: an automatic or
                                 ``FASTDD_BACKEND`` choice of ``cuda`` lands here; naming it in
                                 ``backend=`` is a BackendUnavailableError)
torch        anywhere            :func:`bn_eval_stats_reference` differentiated by autograd
===========  ==================  =====================================================================

Registration: one ``torch.library.custom_op`` per direction (``fastdd::bn_eval_stats`` /
``fastdd::bn_eval_stats_backward``) with ``register_fake`` / ``register_autograd``, tagged
``flexible_layout`` (inductor hands over the layout its convolutions produce).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fastdd.ops._backend import BackendUnavailableError, declare_closed_form, resolve_backend, triton_kernels
from fastdd.ops._common import FLOAT_DTYPES, acc_dtype, channels_last_only, check_backend_name, dispatch
from fastdd.validation import check_tensor

__all__ = ["bn_eval_stats", "bn_eval_stats_reference", "eval_affine"]

_OP = "bn_eval_stats"  # native kernel whose presence makes cpp available
declare_closed_form(_OP)
_NATIVE_DTYPES = (torch.float32, torch.float64)


def _layout(x: Tensor) -> torch.memory_format:
    """The layout y and dx take: channels_last for a channels_last x, NCHW-contiguous otherwise."""
    return torch.channels_last if channels_last_only(x) else torch.contiguous_format


def _per_channel(v: Tensor, dtype: torch.dtype) -> Tensor:
    return v.to(dtype).view(1, -1, 1, 1)


# ------------------------------------------------------------------------------------------ reference
def bn_eval_stats_reference(x: Tensor, scale: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Plain-torch spec (autograd): (y [N, C, H, W] in x's dtype, mean [C], biased var [C] in the
    accumulation dtype) of the module docstring."""
    y = x * _per_channel(scale, x.dtype) + _per_channel(shift, x.dtype)
    var, mean = torch.var_mean(x.to(acc_dtype(x.dtype)), dim=(0, 2, 3), correction=0)
    return y, mean, var


def eval_affine(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[Tensor, Tensor]:
    """(scale [C], shift [C]) of an eval-mode BatchNorm from its parameters and running statistics:
    scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale (weight 1 and bias 0
    without affine). Differentiable with respect to weight and bias."""
    inv = torch.rsqrt(bn.running_var + bn.eps)
    scale = inv if bn.weight is None else bn.weight * inv
    shift = -bn.running_mean * scale
    return scale, (shift if bn.bias is None else bn.bias + shift)


# --------------------------------------------------------------------------------------------- backends
def _closed_form_fwd(x: Tensor, scale: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor]:
    x = x.contiguous(memory_format=_layout(x))
    y = torch.addcmul(_per_channel(shift, x.dtype), x, _per_channel(scale, x.dtype))
    var, mean = torch.var_mean(x.to(acc_dtype(x.dtype)), dim=(0, 2, 3), correction=0)
    return y.contiguous(memory_format=_layout(x)), torch.stack([mean, var], 1)


def _closed_form_bwd(gy: Tensor, x: Tensor, scale: Tensor, c0: Tensor, c1: Tensor) -> Tensor:
    """In the accumulation dtype (c0 and c1 x cancel: fp16 / bf16 coefficients would lose the gradient), cast once."""
    fmt = _layout(x)
    x = x.contiguous(memory_format=fmt)
    acc = acc_dtype(x.dtype)
    dx = torch.addcmul(_per_channel(c0, acc), x, _per_channel(c1, acc))
    dx = dx.addcmul_(gy, _per_channel(scale, acc))
    return dx.to(x.dtype).contiguous(memory_format=fmt)


def _native_fwd(x: Tensor, scale: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor]:
    if x.dtype not in _NATIVE_DTYPES:
        return _closed_form_fwd(x, scale, shift)
    y, stats = torch.ops.fastdd_C.bn_eval_stats(x, scale.to(x.dtype), shift.to(x.dtype))
    return y, stats.to(acc_dtype(x.dtype))


def _native_bwd(gy: Tensor, x: Tensor, scale: Tensor, c0: Tensor, c1: Tensor) -> Tensor:
    if x.dtype not in _NATIVE_DTYPES:
        return _closed_form_bwd(gy, x, scale, c0, c1)
    dt = x.dtype
    return torch.ops.fastdd_C.bn_eval_stats_backward(gy.to(dt), x, scale.to(dt), c0.to(dt), c1.to(dt))


def _triton_fwd(x: Tensor, scale: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor]:
    if x.dtype == torch.float64:
        return _closed_form_fwd(x, scale, shift)
    fmt = _layout(x)
    x = x.contiguous(memory_format=fmt)
    y = torch.empty_like(x, memory_format=fmt)
    return triton_kernels("bn_eval_stats").launch_forward(x, scale.float().contiguous(), shift.float().contiguous(), y,
                                                          fmt == torch.channels_last)


def _triton_bwd(gy: Tensor, x: Tensor, scale: Tensor, c0: Tensor, c1: Tensor) -> Tensor:
    if x.dtype == torch.float64:
        return _closed_form_bwd(gy, x, scale, c0, c1)
    fmt = _layout(x)
    x = x.contiguous(memory_format=fmt)
    dx = torch.empty_like(x, memory_format=fmt)
    return triton_kernels("bn_eval_stats").launch_backward(gy.to(x.dtype).contiguous(memory_format=fmt), x,
                                                           *(v.float().contiguous() for v in (scale, c0, c1)), dx,
                                                           fmt == torch.channels_last)


_FWD = {"cpp": _native_fwd, "closed_form": _closed_form_fwd, "triton": _triton_fwd}
_BWD = {"cpp": _native_bwd, "closed_form": _closed_form_bwd, "triton": _triton_bwd}
_IMPLEMENTED = ("triton", "cpp", "closed_form", "torch")


# ------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastdd::bn_eval_stats", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _bn_eval_stats_op(x: Tensor, scale: Tensor, shift: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(y [N, C, H, W] in x's layout rule, mean [C], var [C]) on the resolved ``backend``."""
    y, stats = dispatch(_FWD, backend, "bn_eval_stats")(x, scale, shift)
    return y, stats[:, 0].clone(), stats[:, 1].clone()  # outputs may not alias each other


@_bn_eval_stats_op.register_fake
def _(x, scale, shift, backend):
    sdt = acc_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=_layout(x)), x.new_empty((x.shape[1],), dtype=sdt),
            x.new_empty((x.shape[1],), dtype=sdt))


@torch.library.custom_op("fastdd::bn_eval_stats_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _bn_eval_stats_backward_op(gy: Tensor, x: Tensor, scale: Tensor, c0: Tensor, c1: Tensor,
                               backend: str) -> Tensor:
    """dx [N, C, H, W] (x's dtype and layout rule) = (c0 + c1 x) + scale gy per channel, one pass."""
    return dispatch(_BWD, backend, "bn_eval_stats_backward")(gy, x, scale, c0, c1)


@_bn_eval_stats_backward_op.register_fake
def _(gy, x, scale, c0, c1, backend):
    return torch.empty_like(x, memory_format=_layout(x))


def _setup(ctx, inputs, output):
    x, scale, _shift, backend = inputs
    ctx.save_for_backward(x, scale, output[1])
    ctx.backend = backend


def _backward(ctx, gy, g_mean, g_var):
    x, scale, mean = ctx.saved_tensors
    need_x, need_scale, need_shift = ctx.needs_input_grad[:3]
    if gy is None:
        gy = torch.zeros_like(x, memory_format=_layout(x))
    dx = dscale = dshift = None
    if need_x:
        sdt = acc_dtype(x.dtype)
        m = x.numel() // x.shape[1]
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean.to(sdt)
        g_var = torch.zeros_like(mean) if g_var is None else g_var.to(sdt)
        c1 = g_var * (2.0 / m)
        c0 = g_mean / m - c1 * mean
        dx = _bn_eval_stats_backward_op(gy, x, scale.to(sdt), c0, c1, ctx.backend)
    if need_scale:
        dscale = (gy * x).sum((0, 2, 3)).to(scale.dtype)
    if need_shift:
        dshift = gy.sum((0, 2, 3)).to(scale.dtype)
    return dx, dscale, dshift, None


_bn_eval_stats_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------- public API
def bn_eval_stats(x: Tensor, scale: Tensor, shift: Tensor, *,
                  backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Eval BatchNorm and the batch statistics of its input in one pass (module docstring).

    x [N, C, H, W] floating (float16 / bfloat16 / float32 / float64), non-empty; scale, shift [C] floating
    on x's device. Returns (y [N, C, H, W] in x's dtype, channels_last if x is; mean [C], biased var [C]
    float32, float64 for float64 x), differentiable with respect to x, scale and shift."""
    check_tensor("x", x, ndim=4, layout="[N, C, H, W]", dtypes=FLOAT_DTYPES, nonempty=True)
    for name, v in (("scale", scale), ("shift", shift)):
        check_tensor(name, v, shape=(x.shape[1],), dtypes=FLOAT_DTYPES, device=x.device)
    check_backend_name(backend)
    if backend not in (None, "auto") and backend not in _IMPLEMENTED:
        raise BackendUnavailableError(f"backend: {backend!r} has no bn_eval_stats kernel (this op has "
                                      f"{list(_IMPLEMENTED)})")
    name = resolve_backend(_OP, x.device.type, backend)
    if name not in _IMPLEMENTED:  # automatic / FASTDD_BACKEND choice of a kernel this op lacks (cuda)
        name = "closed_form"
    if name == "torch":
        return bn_eval_stats_reference(x, scale, shift)
    return _bn_eval_stats_op(x, scale, shift, name)
