"""Per-class MMD between real and synthetic features (DM, DANCE, DDM), forward and backward.

Contract (shapes: real [Nr, D], syn [Ns, D], labels [Nr] / [Ns] int64 or int32 in [0, K))
-----------------------------------------------------------------------------------------
* ``class_means(x, labels, K) -> [K, D]``: per-class mean of the rows of ``x`` (segmented mean, zeros for
  an empty class), in ``x.dtype``.
* ``class_mmd(...) -> []``: ``sum_c || mean(real[real_labels == c]) - mean(syn[syn_labels == c]) ||^2``,
  no normalisation by D or K (DM's loss). Backward:
  ``d real_i = 2 (mu_r[c] - mu_s[c]) / n_r[c] * g`` and ``d syn_j = -2 (mu_r[c] - mu_s[c]) / n_s[c] * g``.
* ``gaussian_class_mmd(..., bandwidths) -> []``: ``sum_c MMD_c^2`` with the biased V-statistic (diagonal
  included) ``MMD_c^2 = mean_{i,i'} k(r_i, r_i') + mean_{j,j'} k(s_j, s_j') - 2 mean_{i,j} k(r_i, s_j)``
  over the rows of class c and the kernel ``k(x, y) = sum_b exp(-||x - y||^2 / (2 sigma_b^2))`` for
  ``bandwidths = [sigma_1, ...]`` (a sum, not a mean, over bandwidths; sigma in feature units).

A class with rows on one side only is an error when validated ("class 3 has real samples but no synthetic
samples"); without validation every backend treats the mean over an empty set as 0 (so such a class adds
``||mu_r||^2``, or ``mean k(r, r')`` for the Gaussian kernel). A class absent from both sides adds 0.
Outputs are in the input dtype; every backend accumulates in fp32 (fp64 for fp64 inputs).

Backends and registration
-------------------------
===========  ==================  ======================================================================
backend      device              implementation
===========  ==================  ======================================================================
triton       CUDA (CPU interp.)  ``kernels/class_mmd.py`` (loaded lazily: ``fastdd.kernels.class_mmd``,
                                 or ``<repo>/kernels/class_mmd.py`` in a source tree without install)
cuda         CUDA                ``csrc/class_mmd/class_mmd_cuda.cu`` -> ``torch.ops.fastdd_C.*``
cpp          CPU                 ``csrc/class_mmd/class_mmd_cpu.cpp`` (OpenMP) -> ``torch.ops.fastdd_C.*``
closed_form  anywhere            plain-torch forward with the hand-derived backward in this file (dense
                                 kernel matrices for Gaussian)
torch        anywhere            the ``*_reference`` functions, differentiated by autograd
===========  ==================  ======================================================================

Registration follows the op-layer rule (``fastdd/ops/README.md``): the public functions resolve the
backend in Python (:func:`fastdd.ops._backend.resolve_backend`, a constant under ``torch.compile``);
``torch`` calls the reference; every other backend runs inside one ``torch.library.custom_op`` per
direction (``fastdd::class_mmd`` / ``fastdd::class_mmd_backward``, ``fastdd::class_means``,
``fastdd::gaussian_class_mmd`` / ``fastdd::gaussian_class_mmd_backward``) with ``register_fake`` and
``register_autograd``, which looks the launcher up by the resolved name. The forward op of the linear
MMD also returns the per-class difference of means and inverse counts (fp32/fp64), which its backward
reuses, so the backward is one write pass over the gradient. ``backend=None`` means automatic choice (or
``FASTDD_BACKEND``); naming an unavailable backend raises :class:`BackendUnavailableError`.

Cost of the op layer: the custom-op dispatch and its autograd wrapper add roughly 0.1 ms per forward
and 0.2 ms per forward+backward on a CPU (the raw C++ call itself is ~10 us); negligible at DM sizes.
The C++ and CUDA kernels are deterministic (fixed reduction order, no floating-point atomics).

Validation: the public functions check shapes, dtypes and devices always (static, compile-safe) and, with
``validate=True`` outside ``torch.compile``, label ranges and classes present on one side only (these
need a host sync). The kernels trust their labels (the C++ CPU kernels still range-check, cheaply).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastdd.ops._backend import BackendUnavailableError, declare_closed_form, resolve_backend, triton_kernels
from fastdd.ops._common import acc_dtype, check_backend_name, check_feature_pair, check_features, dispatch
from fastdd.validation import check_row_labels

__all__ = [
    "class_means",
    "class_means_reference",
    "class_mmd",
    "class_mmd_reference",
    "gaussian_class_mmd",
    "gaussian_class_mmd_reference",
    "validate_class_mmd_inputs",
    "BackendUnavailableError",
]

# names of the native kernels (``torch.ops.fastdd_C.<name>``) that make a backend available
_OP_LINEAR = "class_mmd_fwd"
_OP_MEANS = "class_means"
_OP_GAUSS = "gaussian_class_mmd_fwd"
for _op in (_OP_LINEAR, _OP_MEANS, _OP_GAUSS):
    declare_closed_form(_op)


# ------------------------------------------------------------------------------------------ references
def _class_sums_counts(x: Tensor, labels: Tensor, num_classes: int) -> Tuple[Tensor, Tensor]:
    """(sums [K, D], counts [K]) in the accumulation dtype."""
    acc = acc_dtype(x.dtype)
    labels = labels.to(torch.int64)
    sums = x.new_zeros((num_classes, x.shape[1]), dtype=acc).index_add_(0, labels, x.to(acc))
    counts = x.new_zeros((num_classes,), dtype=acc).index_add_(0, labels, torch.ones_like(labels, dtype=acc))
    return sums, counts


def _inverse(counts: Tensor) -> Tensor:
    return torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))


def class_means_reference(x: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Plain-torch segmented mean: ``out[c] = mean(x[labels == c])``, [K, D] in ``x.dtype`` (0 if empty)."""
    sums, counts = _class_sums_counts(x, labels, num_classes)
    return (sums * _inverse(counts).unsqueeze(1)).to(x.dtype)


def _linear_parts(real, real_labels, syn, syn_labels, num_classes):
    sr, nr = _class_sums_counts(real, real_labels, num_classes)
    ss, ns = _class_sums_counts(syn, syn_labels, num_classes)
    inv_nr, inv_ns = _inverse(nr), _inverse(ns)
    diff = sr * inv_nr.unsqueeze(1) - ss * inv_ns.unsqueeze(1)
    return diff, inv_nr, inv_ns


def class_mmd_reference(real: Tensor, real_labels: Tensor, syn: Tensor, syn_labels: Tensor,
                        num_classes: int) -> Tensor:
    """Plain-torch spec of :func:`class_mmd` (differentiable by autograd); 0-d tensor in ``real.dtype``."""
    diff, _, _ = _linear_parts(real, real_labels, syn, syn_labels, num_classes)
    return diff.square().sum().to(real.dtype)


def _pair_kernel(a: Tensor, b: Tensor, bandwidths: Sequence[float]) -> Tensor:
    """Dense ``k(a_i, b_j) = sum_s exp(-||a_i - b_j||^2 / (2 sigma_s^2))``, [Na, Nb]."""
    d2 = (a.square().sum(1, keepdim=True) + b.square().sum(1).unsqueeze(0) - 2.0 * (a @ b.T)).clamp_min(0)
    k = torch.zeros_like(d2)
    for sigma in bandwidths:
        k = k + torch.exp(d2 * (-1.0 / (2.0 * float(sigma) ** 2)))
    return k


def gaussian_class_mmd_reference(real: Tensor, real_labels: Tensor, syn: Tensor, syn_labels: Tensor,
                                 num_classes: int, bandwidths: Sequence[float]) -> Tensor:
    """Plain-torch spec of :func:`gaussian_class_mmd` (dense [N, N] kernel matrices, differentiable).

    With one-hot weights ``w_r[i, c] = [c_i = c] / n_r[c]``:
    ``loss = sum(w_r * (K_rr w_r)) + sum(w_s * (K_ss w_s)) - 2 sum(w_r * (K_rs w_s))``.
    """
    acc = acc_dtype(real.dtype)
    r, s = real.to(acc), syn.to(acc)
    _, nr = _class_sums_counts(real[:, :0], real_labels, num_classes)
    _, ns = _class_sums_counts(syn[:, :0], syn_labels, num_classes)
    w_r = torch.nn.functional.one_hot(real_labels.to(torch.int64), num_classes).to(acc) * _inverse(nr)
    w_s = torch.nn.functional.one_hot(syn_labels.to(torch.int64), num_classes).to(acc) * _inverse(ns)
    loss = (w_r * (_pair_kernel(r, r, bandwidths) @ w_r)).sum()
    loss = loss + (w_s * (_pair_kernel(s, s, bandwidths) @ w_s)).sum()
    loss = loss - 2.0 * (w_r * (_pair_kernel(r, s, bandwidths) @ w_s)).sum()
    return loss.to(real.dtype)


def _gaussian_grad_torch(grad, real, real_labels, syn, syn_labels, num_classes, bandwidths, need_real, need_syn):
    """Dense plain-torch gradient of the Gaussian class MMD (closed form, no autograd)."""
    acc = acc_dtype(real.dtype)
    r, s = real.to(acc), syn.to(acc)
    g = grad.to(acc)
    lr, ls = real_labels.to(torch.int64), syn_labels.to(torch.int64)
    _, nr = _class_sums_counts(real[:, :0], lr, num_classes)
    _, ns = _class_sums_counts(syn[:, :0], ls, num_classes)
    inv_r, inv_s = _inverse(nr), _inverse(ns)

    def weights(a, b):  # W_ij = sum_s exp(-d2 / (2 sigma^2)) / sigma^2
        d2 = (a.square().sum(1, keepdim=True) + b.square().sum(1).unsqueeze(0) - 2.0 * (a @ b.T)).clamp_min(0)
        w = torch.zeros_like(d2)
        for sigma in bandwidths:
            w = w + torch.exp(d2 * (-1.0 / (2.0 * float(sigma) ** 2))) / float(sigma) ** 2
        return w

    def term(x, lx, y, ly, coef):  # coef[c] sum_j [c_i = c_j = c] W_ij (x_i - y_j)
        m = weights(x, y) * (lx.unsqueeze(1) == ly.unsqueeze(0)) * coef[lx].unsqueeze(1)
        return m.sum(1, keepdim=True) * x - m @ y

    cross = 2.0 * g * inv_r * inv_s
    gr = gs = None
    if need_real:
        gr = (term(r, lr, r, lr, -2.0 * g * inv_r * inv_r) + term(r, lr, s, ls, cross)).to(real.dtype)
    if need_syn:
        gs = (term(s, ls, s, ls, -2.0 * g * inv_s * inv_s) + term(s, ls, r, lr, cross)).to(syn.dtype)
    D = real.shape[1]
    return (gr if need_real else real.new_empty((0, D)), gs if need_syn else syn.new_empty((0, D)))


# --------------------------------------------------------------------------------------------- backends
def _triton():
    return triton_kernels("class_mmd")


def _native():
    return torch.ops.fastdd_C


def _linear_fwd_native(real, real_labels, syn, syn_labels, num_classes):
    return tuple(_native().class_mmd_fwd(real, real_labels, syn, syn_labels, num_classes))


def _linear_fwd_closed_form(real, real_labels, syn, syn_labels, num_classes):
    diff, inv_nr, inv_ns = _linear_parts(real, real_labels, syn, syn_labels, num_classes)
    return diff.square().sum().to(real.dtype), diff, inv_nr, inv_ns


def _linear_bwd_native(*args):
    return tuple(_native().class_mmd_bwd(*args))


def _linear_bwd_closed_form(grad, diff, inv_nr, inv_ns, real_labels, syn_labels, need_real, need_syn, dtype):
    g2 = 2.0 * grad.to(diff.dtype)
    D = diff.shape[1]
    gr = ((diff * (g2 * inv_nr).unsqueeze(1)).index_select(0, real_labels.to(torch.int64)).to(dtype)
          if need_real else diff.new_empty((0, D), dtype=dtype))
    gs = ((diff * (-g2 * inv_ns).unsqueeze(1)).index_select(0, syn_labels.to(torch.int64)).to(dtype)
          if need_syn else diff.new_empty((0, D), dtype=dtype))
    return gr, gs


def _means_native(x, labels, num_classes):
    _, counts = _class_sums_counts(x[:, :0], labels, num_classes)
    return _native().class_means(x, labels, num_classes), _inverse(counts)


def _means_closed_form(x, labels, num_classes):
    sums, counts = _class_sums_counts(x, labels, num_classes)
    inv = _inverse(counts)
    return (sums * inv.unsqueeze(1)).to(x.dtype), inv


def _gauss_bwd_native(*args):
    return tuple(_native().gaussian_class_mmd_bwd(*args))


_LINEAR_FWD = {"cpp": _linear_fwd_native, "cuda": _linear_fwd_native, "closed_form": _linear_fwd_closed_form,
               "triton": lambda *args: _triton().class_mmd_forward(*args)}
_LINEAR_BWD = {"cpp": _linear_bwd_native, "cuda": _linear_bwd_native, "closed_form": _linear_bwd_closed_form,
               "triton": lambda *args: _triton().class_mmd_backward(*args)}
_MEANS = {"cpp": _means_native, "cuda": _means_native, "closed_form": _means_closed_form,
          "triton": lambda *args: tuple(_triton().class_means(*args))}
_GAUSS_FWD = {"cpp": lambda *args: _native().gaussian_class_mmd_fwd(*args),
              "cuda": lambda *args: _native().gaussian_class_mmd_fwd(*args),
              "closed_form": lambda *args: gaussian_class_mmd_reference(*args),
              "triton": lambda *args: _triton().gaussian_class_mmd_forward(*args)}
_GAUSS_BWD = {"cpp": _gauss_bwd_native, "cuda": _gauss_bwd_native,
              "closed_form": lambda *args: _gaussian_grad_torch(*args),
              "triton": lambda *args: _triton().gaussian_class_mmd_backward(*args)}


# ------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fastdd::class_mmd", mutates_args=())
def _class_mmd_op(real: Tensor, real_labels: Tensor, syn: Tensor, syn_labels: Tensor, num_classes: int,
                  backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss [] real.dtype, diff [K, D] acc, inv_nr [K] acc, inv_ns [K] acc)."""
    loss, diff, inv_nr, inv_ns = dispatch(_LINEAR_FWD, backend, "class_mmd")(real, real_labels, syn, syn_labels,
                                                                             num_classes)
    return loss, diff, inv_nr, inv_ns


@_class_mmd_op.register_fake
def _(real, real_labels, syn, syn_labels, num_classes, backend):
    acc = acc_dtype(real.dtype)
    return (real.new_empty(()), real.new_empty((num_classes, real.shape[1]), dtype=acc),
            real.new_empty((num_classes,), dtype=acc), real.new_empty((num_classes,), dtype=acc))


@torch.library.custom_op("fastdd::class_mmd_backward", mutates_args=())
def _class_mmd_backward_op(grad: Tensor, diff: Tensor, inv_nr: Tensor, inv_ns: Tensor, real_labels: Tensor,
                           syn_labels: Tensor, need_real: bool, need_syn: bool, dtype: torch.dtype,
                           backend: str) -> Tuple[Tensor, Tensor]:
    """(grad_real [Nr, D] or [0, D], grad_syn [Ns, D] or [0, D]) in ``dtype``."""
    gr, gs = dispatch(_LINEAR_BWD, backend, "class_mmd_backward")(grad, diff, inv_nr, inv_ns, real_labels,
                                                                  syn_labels, need_real, need_syn, dtype)
    return gr, gs


@_class_mmd_backward_op.register_fake
def _(grad, diff, inv_nr, inv_ns, real_labels, syn_labels, need_real, need_syn, dtype, backend):
    D = diff.shape[1]
    return (diff.new_empty((real_labels.shape[0] if need_real else 0, D), dtype=dtype),
            diff.new_empty((syn_labels.shape[0] if need_syn else 0, D), dtype=dtype))


def _class_mmd_setup(ctx, inputs, output):
    real, real_labels, syn, syn_labels, num_classes, backend = inputs
    _, diff, inv_nr, inv_ns = output
    ctx.save_for_backward(diff, inv_nr, inv_ns, real_labels, syn_labels)
    ctx.mark_non_differentiable(diff, inv_nr, inv_ns)
    ctx.dtype = real.dtype
    ctx.backend = backend


def _class_mmd_backward(ctx, grad_loss, _grad_diff, _grad_inr, _grad_ins):
    diff, inv_nr, inv_ns, real_labels, syn_labels = ctx.saved_tensors
    need_real, need_syn = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    gr, gs = torch.ops.fastdd.class_mmd_backward(grad_loss, diff, inv_nr, inv_ns, real_labels, syn_labels,
                                                 need_real, need_syn, ctx.dtype, ctx.backend)
    return (gr if need_real else None), None, (gs if need_syn else None), None, None, None


_class_mmd_op.register_autograd(_class_mmd_backward, setup_context=_class_mmd_setup)


@torch.library.custom_op("fastdd::class_means", mutates_args=())
def _class_means_op(x: Tensor, labels: Tensor, num_classes: int, backend: str) -> Tuple[Tensor, Tensor]:
    """(means [K, D] in x.dtype, inv_counts [K] acc dtype)."""
    means, inv = dispatch(_MEANS, backend, "class_means")(x, labels, num_classes)
    return means, inv


@_class_means_op.register_fake
def _(x, labels, num_classes, backend):
    return x.new_empty((num_classes, x.shape[1])), x.new_empty((num_classes,), dtype=acc_dtype(x.dtype))


def _class_means_setup(ctx, inputs, output):
    x, labels, _, _ = inputs
    ctx.save_for_backward(labels, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.dtype = x.dtype


def _class_means_backward(ctx, grad_means, _grad_inv):
    labels, inv = ctx.saved_tensors
    # d x_i = grad_means[c_i] / n[c_i]: one gather (plain torch, traceable)
    gx = (grad_means.to(inv.dtype) * inv.unsqueeze(1)).index_select(0, labels.to(torch.int64)).to(ctx.dtype)
    return gx, None, None, None


_class_means_op.register_autograd(_class_means_backward, setup_context=_class_means_setup)


@torch.library.custom_op("fastdd::gaussian_class_mmd", mutates_args=())
def _gaussian_op(real: Tensor, real_labels: Tensor, syn: Tensor, syn_labels: Tensor, num_classes: int,
                 bandwidths: List[float], backend: str) -> Tensor:
    """Gaussian per-class MMD^2 summed over classes, [] in real.dtype."""
    return dispatch(_GAUSS_FWD, backend, "gaussian_class_mmd")(real, real_labels, syn, syn_labels, num_classes,
                                                               bandwidths)


@_gaussian_op.register_fake
def _(real, real_labels, syn, syn_labels, num_classes, bandwidths, backend):
    return real.new_empty(())


@torch.library.custom_op("fastdd::gaussian_class_mmd_backward", mutates_args=())
def _gaussian_backward_op(grad: Tensor, real: Tensor, real_labels: Tensor, syn: Tensor, syn_labels: Tensor,
                          num_classes: int, bandwidths: List[float], need_real: bool, need_syn: bool,
                          backend: str) -> Tuple[Tensor, Tensor]:
    """(grad_real [Nr, D] or [0, D], grad_syn [Ns, D] or [0, D]) in the input dtype."""
    gr, gs = dispatch(_GAUSS_BWD, backend, "gaussian_class_mmd_backward")(
        grad, real, real_labels, syn, syn_labels, num_classes, bandwidths, need_real, need_syn)
    return gr, gs


@_gaussian_backward_op.register_fake
def _(grad, real, real_labels, syn, syn_labels, num_classes, bandwidths, need_real, need_syn, backend):
    D = real.shape[1]
    return (real.new_empty((real.shape[0] if need_real else 0, D)),
            syn.new_empty((syn.shape[0] if need_syn else 0, D)))


def _gaussian_setup(ctx, inputs, output):
    real, real_labels, syn, syn_labels, num_classes, bandwidths, backend = inputs
    ctx.save_for_backward(real, real_labels, syn, syn_labels)
    ctx.num_classes, ctx.bandwidths, ctx.backend = num_classes, bandwidths, backend


def _gaussian_backward(ctx, grad):
    real, real_labels, syn, syn_labels = ctx.saved_tensors
    need_real, need_syn = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    gr, gs = torch.ops.fastdd.gaussian_class_mmd_backward(grad, real, real_labels, syn, syn_labels, ctx.num_classes,
                                                          ctx.bandwidths, need_real, need_syn, ctx.backend)
    return (gr if need_real else None), None, (gs if need_syn else None), None, None, None, None


_gaussian_op.register_autograd(_gaussian_backward, setup_context=_gaussian_setup)


# ------------------------------------------------------------------------------------------- validation
def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_labels_static(name: str, labels, n: int, device, num_classes: int) -> None:
    check_row_labels(name, labels, n, device)


def _check_num_classes(num_classes) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        if not isinstance(num_classes, torch.SymInt):
            raise TypeError(f"num_classes: expected an int, got {type(num_classes).__name__}")
    if not isinstance(num_classes, torch.SymInt) and num_classes < 1:
        raise ValueError(f"num_classes: must be >= 1, got {num_classes}")


def _check_label_values(name: str, labels: Tensor, num_classes: int) -> None:
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name}: labels must lie in [0, {num_classes}), found range [{lo}, {hi}]")


def _check_bandwidths(bandwidths) -> List[float]:
    if isinstance(bandwidths, (int, float)) and not isinstance(bandwidths, bool):
        bandwidths = [bandwidths]
    try:
        values = [float(b) for b in bandwidths]
    except TypeError:
        raise TypeError(f"bandwidths: expected a number or a sequence of numbers, got {type(bandwidths).__name__}") from None
    if not values:
        raise ValueError("bandwidths: expected at least one bandwidth")
    for b in values:
        if not (b > 0 and b != float("inf")):
            raise ValueError(f"bandwidths: every bandwidth must be a positive finite number, got {b}")
    return values


def validate_class_mmd_inputs(real, real_labels, syn, syn_labels, num_classes, *, check_values: bool = True,
                              check_finite: bool = False) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the bad argument.

    Always (static, compile-safe): ndim, dtypes, matching D, dtypes and devices, label shapes and dtypes.
    With ``check_values`` (skipped while compiling; needs a host sync): label range, and every class
    present on both sides or on neither. ``check_finite`` also rejects NaN/Inf features.
    """
    check_feature_pair("real", real, "syn", syn)
    _check_num_classes(num_classes)
    _check_labels_static("real_labels", real_labels, real.shape[0], real.device, num_classes)
    _check_labels_static("syn_labels", syn_labels, syn.shape[0], real.device, num_classes)
    if not check_values or _compiling():
        return
    _check_label_values("real_labels", real_labels, num_classes)
    _check_label_values("syn_labels", syn_labels, num_classes)
    ones = torch.ones((), dtype=torch.int32, device=real.device)
    cr = torch.zeros(num_classes, dtype=torch.int32, device=real.device).index_add_(
        0, real_labels.to(torch.int64), ones.expand(real_labels.shape[0]))
    cs = torch.zeros(num_classes, dtype=torch.int32, device=real.device).index_add_(
        0, syn_labels.to(torch.int64), ones.expand(syn_labels.shape[0]))
    bad = ((cr > 0) != (cs > 0)).nonzero()
    if bad.numel():
        c = int(bad[0, 0])
        if int(cr[c]) > 0:
            raise ValueError(f"class {c} has real samples but no synthetic samples (real_labels / syn_labels)")
        raise ValueError(f"class {c} has synthetic samples but no real samples (real_labels / syn_labels)")
    if check_finite:
        for name, x in (("real", real), ("syn", syn)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name}: contains NaN or Inf")


# --------------------------------------------------------------------------------------------- public
def class_mmd(real: Tensor, real_labels: Tensor, syn: Tensor, syn_labels: Tensor, num_classes: int, *,
              backend: Optional[str] = None, validate: bool = True, check_finite: bool = False) -> Tensor:
    """``sum_c ||mean(real[real_labels == c]) - mean(syn[syn_labels == c])||^2`` -> 0-d tensor (real.dtype).

    real [Nr, D], syn [Ns, D] (same dtype and device), labels int64/int32 [Nr] / [Ns] in [0, num_classes).
    Differentiable w.r.t. ``real`` and ``syn``; ``backend`` forces one implementation (see module doc).
    """
    check_backend_name(backend)
    validate_class_mmd_inputs(real, real_labels, syn, syn_labels, num_classes, check_values=validate,
                              check_finite=check_finite)
    name = resolve_backend(_OP_LINEAR, real.device.type, backend)
    if name == "torch":
        return class_mmd_reference(real, real_labels, syn, syn_labels, num_classes)
    return torch.ops.fastdd.class_mmd(real, real_labels, syn, syn_labels, num_classes, name)[0]


def class_means(x: Tensor, labels: Tensor, num_classes: int, *, backend: Optional[str] = None,
                validate: bool = True) -> Tensor:
    """Segmented mean ``out[c] = mean(x[labels == c])`` for all classes at once: [K, D] in ``x.dtype``
    (zeros for a class without rows); x [N, D], labels int64/int32 [N] in [0, num_classes).
    Differentiable w.r.t. ``x``."""
    check_backend_name(backend)
    check_features("x", x)
    _check_num_classes(num_classes)
    _check_labels_static("labels", labels, x.shape[0], x.device, num_classes)
    if validate and not _compiling():
        _check_label_values("labels", labels, num_classes)
    name = resolve_backend(_OP_MEANS, x.device.type, backend)
    if name == "torch":
        return class_means_reference(x, labels, num_classes)
    return torch.ops.fastdd.class_means(x, labels, num_classes, name)[0]


def gaussian_class_mmd(real: Tensor, real_labels: Tensor, syn: Tensor, syn_labels: Tensor, num_classes: int,
                       bandwidths, *, backend: Optional[str] = None, validate: bool = True,
                       check_finite: bool = False) -> Tensor:
    """Gaussian-kernel per-class MMD^2 summed over classes -> 0-d tensor (real.dtype).

    ``k(x, y) = sum_b exp(-||x - y||^2 / (2 sigma_b^2))`` for ``bandwidths = [sigma_b]`` (a float or a
    sequence); per class the biased V-statistic ``mean k(r, r') + mean k(s, s') - 2 mean k(r, s)``
    (diagonal included). Fused backends tile same-class pairs and never store an [Nr, Ns] matrix.
    """
    check_backend_name(backend)
    bws = _check_bandwidths(bandwidths)
    validate_class_mmd_inputs(real, real_labels, syn, syn_labels, num_classes, check_values=validate,
                              check_finite=check_finite)
    name = resolve_backend(_OP_GAUSS, real.device.type, backend)
    if name == "torch":
        return gaussian_class_mmd_reference(real, real_labels, syn, syn_labels, num_classes, bws)
    return torch.ops.fastdd.gaussian_class_mmd(real, real_labels, syn, syn_labels, num_classes, bws, name)
