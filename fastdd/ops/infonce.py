"""Fused InfoNCE / binary-NCE loss between synthetic and real embeddings (MIM4DD), forward and backward.

Contract (shapes: syn [Ns, D], real [Nr, D], labels int64/int32 [Ns] / [Nr])
----------------------------------------------------------------------------
Rows are L2-normalised when ``normalize=True`` (``z = x / max(||x||, 1e-12)``, as ``F.normalize``; the
normalisation and its gradient are part of the op), else ``z = x``. Similarities
``s_ij = z_s_i . z_r_j / temperature``; the pair (i, j) is *positive* when ``syn_labels[i] ==
real_labels[j]``, negative otherwise. ``P_i`` / ``N_i = Nr - P_i``: positives / negatives of anchor i.

* ``form="supcon"`` (multi-positive InfoNCE, spec 3.2):
  ``L_i = -(1/P_i) sum_{p in P(i)} [s_ip - logsumexp_j s_ij]`` (the log-sum-exp runs over *all* real
  rows, positives included), ``loss = mean_i L_i``.
* ``form="nce"`` (CRD/CMIM binary critic, spec 2.3): ``h = exp(s) / (exp(s) + c)`` i.e.
  ``h = sigmoid(s - log c)``, and
  ``L_i = -(1/P_i) sum_{p in P(i)} log h(s_ip)  -  sum_{n in N(i)} log(1 - h(s_in))``
  (computed stably: ``-log h = softplus(log c - s)``, ``-log(1 - h) = softplus(s - log c)``),
  ``loss = mean_i L_i``. Reading of the spec: CRD has one positive and N negatives per anchor; with
  label-defined positives we average the positive terms (``-E_pos log h``) and *sum* the negative terms
  (``N * E_neg``), exactly CRD's ``-log h(pos) - sum_N log(1 - h(neg))`` when P_i = 1.
  ``nce_negatives="mean"`` switches to the per-anchor mean over negatives (balanced; weight 1/N_i).
  The constant ``c = N/M``: by default per anchor ``c_i = N_i / Nr`` (N = the anchor's negatives, M =
  the size of the set the negatives are drawn from, here the real batch). A float ``nce_constant``
  fixes c for every anchor (e.g. CRD's memory bank: ``4096 / dataset_size``). An anchor whose every
  real row is positive (N_i = 0) under the default constant has c_i = 0, h = 1 and contributes 0.

Anchors without a positive (``P_i = 0``): an error under ``validate=True``; with ``validate=False`` they
are excluded from the mean (both forms; the mean is over the anchors that have positives, and a loss
without any such anchor is 0 with zero gradient).

The loss is a 0-d tensor in ``syn.dtype``; backends accumulate in fp32 (fp64 for fp64 inputs).
Gradients flow to ``syn`` and ``real``.

Backends and algorithm
----------------------
===========  ==================  ======================================================================
backend      device              implementation
===========  ==================  ======================================================================
triton       CUDA (CPU interp.)  ``kernels/infonce.py`` (``fastdd.kernels.infonce`` or ``<repo>/kernels``)
cuda         CUDA                ``csrc/infonce/infonce_cuda.cu`` -> ``torch.ops.fastdd_C.infonce_*``
cpp          CPU                 ``csrc/infonce/infonce_cpu.cpp`` (at::parallel_for, deterministic
                                 similarity tiles, one copy per SIMD path)
closed_form  anywhere            this file, row chunks of 1024 anchors against all real rows, with the
                                 hand-derived backward
torch        anywhere            :func:`infonce_loss_reference` (dense [Ns, Nr]) differentiated by autograd
===========  ==================  ======================================================================

Flash-attention pattern: the forward visits [BM, BN] tiles of S (recomputed from the rows, never stored),
keeps per anchor an online max / sum of exponentials (supcon) or the softplus sums (nce) and writes one
log-sum-exp and one loss term per anchor. The backward recomputes the tiles and forms
``dS_ij = w_i exp(s_ij - lse_i) - v_i pos_ij`` (supcon; ``w_i = 1/n``, ``v_i = 1/(n P_i)``, ``n`` the
number of anchors with positives) or ``dS_ij = -v_i (1 - h_ij) pos_ij + u_i h_ij (1 - pos_ij)`` (nce), then
``dZ_s = dS Z_r / tau`` (one pass over anchor tiles) and ``dZ_r = dS^T Z_s / tau`` (one pass over real
tiles: deterministic, no atomics). Memory O((Ns + Nr) D + tiles).

The per-anchor weights (v, w / u), log c and the inverse row norms are computed once per forward in
plain torch (O(Ns log Nr) with a sorted copy of the real labels; no class count needed) and saved; the
kernels receive the row scales ``1 / norm`` and return gradients w.r.t. the scaled rows ``z``; the
normalisation's backward ``dx = (dz - z (z . dz)) / ||x||`` is an O((Ns + Nr) D) epilogue in the same custom op.
Registration follows the op-layer rule (``fastdd/ops/README.md``): the backend is resolved in Python
(:func:`fastdd.ops._backend.resolve_backend`, ``FASTDD_BACKEND`` respected); ``torch`` calls the
reference, every other backend runs inside the custom ops ``fastdd::infonce`` / ``fastdd::infonce_backward``
(``register_fake``, ``register_autograd``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastdd.ops._backend import BackendUnavailableError, declare_closed_form, resolve_backend, triton_kernels
from fastdd.ops._common import acc_dtype, check_backend_name, check_feature_pair, dispatch
from fastdd.validation import check_row_labels

__all__ = [
    "infonce_loss",
    "infonce_loss_reference",
    "validate_infonce_inputs",
    "FORMS",
    "BackendUnavailableError",
]

FORMS = ("supcon", "nce")
NCE_NEGATIVES = ("sum", "mean")
NORM_EPS = 1e-12
_OP = "infonce_fwd"  # native kernel whose presence makes cpp / cuda available
_TORCH_CHUNK = 1024
declare_closed_form(_OP)


def _softplus(x: Tensor) -> Tensor:
    """Exact, stable ``log(1 + exp(x))`` (no threshold approximation)."""
    return torch.logaddexp(x, torch.zeros_like(x))


# ------------------------------------------------------------------------------------------ reference
def infonce_loss_reference(syn: Tensor, syn_labels: Tensor, real: Tensor, real_labels: Tensor, *,
                           temperature: float = 0.1, form: str = "supcon", normalize: bool = True,
                           nce_constant: Optional[float] = None, nce_negatives: str = "sum") -> Tensor:
    """Plain-torch spec of :func:`infonce_loss` with the dense [Ns, Nr] matrix (differentiable by
    autograd); 0-d tensor in ``syn.dtype``, computed in fp32 (fp64 for fp64 inputs)."""
    acc = acc_dtype(syn.dtype)
    zs, zr = syn.to(acc), real.to(acc)
    if normalize:
        zs = torch.nn.functional.normalize(zs, dim=1, eps=NORM_EPS)
        zr = torch.nn.functional.normalize(zr, dim=1, eps=NORM_EPS)
    s = zs @ zr.T / temperature
    pos = (syn_labels.to(torch.int64)[:, None] == real_labels.to(torch.int64)[None, :]).to(acc)
    n_pos = pos.sum(1)
    valid = n_pos > 0
    n_valid = valid.sum().clamp_min(1).to(acc)
    if form == "supcon":
        per = -(s * pos).sum(1) / n_pos.clamp_min(1) + torch.logsumexp(s, dim=1)
    elif form == "nce":
        n_neg = real.shape[0] - n_pos
        if nce_constant is None:
            has_neg = (n_neg > 0).to(acc)
            logc = torch.log(torch.where(n_neg > 0, n_neg / real.shape[0], torch.ones_like(n_neg)))
        else:
            has_neg = torch.ones_like(n_pos)
            logc = torch.full_like(n_pos, math.log(nce_constant))
        pos_term = (_softplus(logc[:, None] - s) * pos).sum(1) / n_pos.clamp_min(1) * has_neg
        neg_term = (_softplus(s - logc[:, None]) * (1 - pos)).sum(1)
        if nce_negatives == "mean":
            neg_term = neg_term / n_neg.clamp_min(1)
        per = pos_term + neg_term
    else:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    return (torch.where(valid, per, torch.zeros_like(per)).sum() / n_valid).to(syn.dtype)


# --------------------------------------------------------------------------------------- shared parts
def _form_id(form: str) -> int:
    return FORMS.index(form)


def _row_norms(x: Tensor, normalize: bool, acc: torch.dtype) -> Tensor:
    """Per-row divisor of ``z = x / norm``: ``max(||x||, eps)`` or ones, [N] in ``acc`` (the kernels get
    ``1 / norm`` as their row scale)."""
    if not normalize:
        return torch.ones(x.shape[0], dtype=acc, device=x.device)
    return torch.linalg.vector_norm(x, dim=1, dtype=acc).clamp_min(NORM_EPS)


def _row_weights(syn_labels: Tensor, real_labels: Tensor, form: str, nce_constant: Optional[float],
                 nce_negatives: str, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(weights [2, Ns], logc [Ns]) in ``acc``: weights[0] = v_i (positive weight), weights[1] = w_i (LSE
    weight, supcon) or u_i (negative weight, nce); logc = log of the NCE constant (zeros for supcon)."""
    ys = syn_labels.to(torch.int64)
    sorted_r = real_labels.to(torch.int64).sort().values
    nr = real_labels.shape[0]
    n_pos = (torch.searchsorted(sorted_r, ys, right=True) - torch.searchsorted(sorted_r, ys)).to(acc)
    valid = (n_pos > 0).to(acc)
    inv_valid = 1.0 / valid.sum().clamp_min(1)
    base = valid * inv_valid
    w_pos = base / n_pos.clamp_min(1)
    if form == "supcon":
        return torch.stack([w_pos, base]), torch.zeros_like(n_pos)
    n_neg = nr - n_pos
    if nce_constant is None:
        has_neg = n_neg > 0
        w_pos = w_pos * has_neg.to(acc)
        logc = torch.log(torch.where(has_neg, n_neg / max(nr, 1), torch.ones_like(n_neg)))
    else:
        logc = torch.full_like(n_pos, math.log(nce_constant))
    w_neg = base if nce_negatives == "sum" else base / n_neg.clamp_min(1)
    return torch.stack([w_pos, w_neg]), logc


def _normalize_backward(dz: Tensor, x: Tensor, norm: Tensor, normalize: bool) -> Tensor:
    """d x from d z for ``z = x / norm`` with ``norm = max(||x||, eps)``:
    ``dx = (dz - [||x|| > eps] z (z . dz)) / norm``; the identity when not normalising."""
    if not normalize:
        return dz.to(x.dtype)
    z = x.to(dz.dtype) / norm[:, None]
    active = (norm > NORM_EPS).to(dz.dtype)  # ||x|| > eps: the norm (not the clamp) is differentiated
    dot = (z * dz).sum(1) * active
    return ((dz - z * dot[:, None]) / norm[:, None]).to(x.dtype)


# ------------------------------------------------------------------------------------ torch backend
def _tile_grad(s: Tensor, pos: Tensor, w: Tensor, lse: Tensor, logc: Tensor, form: int) -> Tensor:
    """dS for a block of anchor rows (s, pos [B, Nr]; w [2, B], lse, logc [B])."""
    if form == 0:
        return w[1][:, None] * torch.exp(s - lse[:, None]) - w[0][:, None] * pos
    h = torch.sigmoid(s - logc[:, None])
    return w[1][:, None] * h * (1 - pos) - w[0][:, None] * (1 - h) * pos


def _torch_fwd(syn, syn_labels, real, real_labels, ss, rs, w, logc, tau, form):
    acc = ss.dtype
    zs = syn.to(acc) * (ss / tau)[:, None]
    zr = real.to(acc) * rs[:, None]
    yr = real_labels.to(torch.int64)
    rows, lses = [], []
    for i0 in range(0, syn.shape[0], _TORCH_CHUNK):
        sl = slice(i0, i0 + _TORCH_CHUNK)
        s = zs[sl] @ zr.T
        pos = (syn_labels[sl].to(torch.int64)[:, None] == yr[None, :]).to(acc)
        if form == 0:
            lse = torch.logsumexp(s, dim=1)
            row = w[1, sl] * lse - w[0, sl] * (s * pos).sum(1)
        else:
            lse = torch.zeros(s.shape[0], dtype=acc, device=s.device)
            lc = logc[sl][:, None]
            row = w[0, sl] * (_softplus(lc - s) * pos).sum(1) + w[1, sl] * (_softplus(s - lc) * (1 - pos)).sum(1)
        rows.append(row)
        lses.append(lse)
    return torch.cat(rows), torch.cat(lses)


def _torch_bwd(syn, syn_labels, real, real_labels, ss, rs, w, logc, lse, tau, form, need_syn, need_real):
    acc = ss.dtype
    zs = syn.to(acc) * (ss / tau)[:, None]
    zr = real.to(acc) * rs[:, None]
    yr = real_labels.to(torch.int64)
    D = syn.shape[1]
    dzs = torch.zeros_like(zs) if need_syn else zs.new_empty((0, D))
    dzr = torch.zeros_like(zr) if need_real else zr.new_empty((0, D))
    for i0 in range(0, syn.shape[0], _TORCH_CHUNK):
        sl = slice(i0, i0 + _TORCH_CHUNK)
        s = zs[sl] @ zr.T
        pos = (syn_labels[sl].to(torch.int64)[:, None] == yr[None, :]).to(acc)
        ds = _tile_grad(s, pos, w[:, sl], lse[sl], logc[sl], form)
        if need_syn:
            dzs[sl] = ds @ zr / tau
        if need_real:
            dzr += ds.T @ zs[sl]
    return dzs, dzr


# -------------------------------------------------------------------------------------------- loaders
def _triton():
    return triton_kernels("infonce")


def _native_fwd(*args):
    return tuple(torch.ops.fastdd_C.infonce_fwd(*args))


def _native_bwd(*args):
    return tuple(torch.ops.fastdd_C.infonce_bwd(*args))


_FWD = {"cpp": _native_fwd, "cuda": _native_fwd, "closed_form": _torch_fwd,
        "triton": lambda *args: _triton().infonce_forward(*args)}
_BWD = {"cpp": _native_bwd, "cuda": _native_bwd, "closed_form": _torch_bwd,
        "triton": lambda *args: _triton().infonce_backward(*args)}


# ------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("fastdd::infonce", mutates_args=())
def _infonce_op(syn: Tensor, syn_labels: Tensor, real: Tensor, real_labels: Tensor, temperature: float,
                form: str, normalize: bool, nce_constant: Optional[float], nce_negatives: str,
                backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [] syn.dtype, lse [Ns], weights [2, Ns], logc [Ns], syn_norm [Ns], real_norm [Nr]); all but
    the loss in the accumulation dtype."""
    acc = acc_dtype(syn.dtype)
    ns_, nr_ = _row_norms(syn, normalize, acc), _row_norms(real, normalize, acc)
    w, logc = _row_weights(syn_labels, real_labels, form, nce_constant, nce_negatives, acc)
    row, lse = dispatch(_FWD, backend, "infonce")(syn, syn_labels, real, real_labels, ns_.reciprocal(),
                                                  nr_.reciprocal(), w, logc, float(temperature), _form_id(form))
    return row.sum().to(syn.dtype), lse, w, logc, ns_, nr_


@_infonce_op.register_fake
def _(syn, syn_labels, real, real_labels, temperature, form, normalize, nce_constant, nce_negatives, backend):
    acc = acc_dtype(syn.dtype)
    ns, nr = syn.shape[0], real.shape[0]
    return (syn.new_empty(()), syn.new_empty((ns,), dtype=acc), syn.new_empty((2, ns), dtype=acc),
            syn.new_empty((ns,), dtype=acc), syn.new_empty((ns,), dtype=acc), syn.new_empty((nr,), dtype=acc))


@torch.library.custom_op("fastdd::infonce_backward", mutates_args=())
def _infonce_backward_op(grad: Tensor, syn: Tensor, syn_labels: Tensor, real: Tensor, real_labels: Tensor,
                         syn_norm: Tensor, real_norm: Tensor, lse: Tensor, weights: Tensor, logc: Tensor,
                         temperature: float, form: str, normalize: bool, need_syn: bool, need_real: bool,
                         backend: str) -> Tuple[Tensor, Tensor]:
    """(grad_syn [Ns, D] or [0, D], grad_real [Nr, D] or [0, D]) in the input dtypes."""
    w = weights * grad.to(weights.dtype)
    dzs, dzr = dispatch(_BWD, backend, "infonce_backward")(
        syn, syn_labels, real, real_labels, syn_norm.reciprocal(), real_norm.reciprocal(), w, logc, lse,
        float(temperature), _form_id(form), need_syn, need_real)
    D = syn.shape[1]
    gs = _normalize_backward(dzs, syn, syn_norm, normalize) if need_syn else syn.new_empty((0, D))
    gr = _normalize_backward(dzr, real, real_norm, normalize) if need_real else real.new_empty((0, D))
    return gs, gr


@_infonce_backward_op.register_fake
def _(grad, syn, syn_labels, real, real_labels, syn_norm, real_norm, lse, weights, logc, temperature, form,
      normalize, need_syn, need_real, backend):
    D = syn.shape[1]
    return (syn.new_empty((syn.shape[0] if need_syn else 0, D)),
            real.new_empty((real.shape[0] if need_real else 0, D)))


def _infonce_setup(ctx, inputs, output):
    syn, syn_labels, real, real_labels, temperature, form, normalize, _c, _neg, backend = inputs
    _, lse, w, logc, ss, rs = output
    ctx.save_for_backward(syn, syn_labels, real, real_labels, ss, rs, lse, w, logc)
    ctx.mark_non_differentiable(lse, w, logc, ss, rs)
    ctx.temperature, ctx.form, ctx.normalize, ctx.backend = temperature, form, normalize, backend


def _infonce_backward(ctx, grad_loss, *_unused):
    syn, syn_labels, real, real_labels, ss, rs, lse, w, logc = ctx.saved_tensors
    need_syn, need_real = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    gs, gr = torch.ops.fastdd.infonce_backward(grad_loss, syn, syn_labels, real, real_labels, ss, rs, lse, w, logc,
                                               ctx.temperature, ctx.form, ctx.normalize, need_syn, need_real,
                                               ctx.backend)
    return (gs if need_syn else None), None, (gr if need_real else None), None, None, None, None, None, None, None


_infonce_op.register_autograd(_infonce_backward, setup_context=_infonce_setup)


# ------------------------------------------------------------------------------------------ validation
def _check_positive(name: str, value, expected: str = "a number") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: must be a positive finite number, got {value}")


def _check_options(temperature, form, nce_constant, nce_negatives, backend) -> None:
    _check_positive("temperature", temperature)
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    if nce_constant is not None:
        if form != "nce":
            raise ValueError("nce_constant: only used with form='nce'")
        _check_positive("nce_constant", nce_constant, "a number or None")
    if nce_negatives not in NCE_NEGATIVES:
        raise ValueError(f"nce_negatives: expected one of {NCE_NEGATIVES}, got {nce_negatives!r}")
    check_backend_name(backend)


def validate_infonce_inputs(syn, syn_labels, real, real_labels, *, num_classes: Optional[int] = None,
                            check_values: bool = True, check_finite: bool = False) -> None:
    """Raise a ``ValueError``/``TypeError`` naming the bad argument.

    Always (static, compile-safe): ndim, non-empty, dtypes, matching D / dtype / device, label shapes,
    dtypes and devices. With ``check_values`` (skipped while compiling; a host sync): labels >= 0 (and
    < ``num_classes`` when given) and every synthetic anchor has at least one real positive;
    ``check_finite`` also rejects NaN/Inf features.
    """
    check_feature_pair("syn", syn, "real", real, nonempty=True)
    check_row_labels("syn_labels", syn_labels, syn.shape[0], syn.device)
    check_row_labels("real_labels", real_labels, real.shape[0], syn.device)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes: expected a positive int or None, got {num_classes!r}")
    if not check_values or torch.compiler.is_compiling():
        return
    for name, labels in (("syn_labels", syn_labels), ("real_labels", real_labels)):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else "[0, inf)"
            raise ValueError(f"{name}: labels must lie in {bound}, found range [{lo}, {hi}]")
    missing = ~torch.isin(syn_labels.to(torch.int64), real_labels.to(torch.int64))
    if bool(missing.any()):
        i = int(missing.nonzero()[0, 0])
        raise ValueError(f"syn_labels: anchor {i} has class {int(syn_labels[i])}, which has no real sample "
                         "(no positive; pass validate=False to exclude such anchors from the mean)")
    if check_finite:
        for name, x in (("syn", syn), ("real", real)):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name}: contains NaN or Inf")


# ------------------------------------------------------------------------------------------------ public
def infonce_loss(syn: Tensor, syn_labels: Tensor, real: Tensor, real_labels: Tensor, *,
                 temperature: float = 0.1, form: str = "supcon", normalize: bool = True,
                 nce_constant: Optional[float] = None, nce_negatives: str = "sum",
                 num_classes: Optional[int] = None, backend: Optional[str] = None, validate: bool = True,
                 check_finite: bool = False) -> Tensor:
    """Label-supervised InfoNCE (``form="supcon"``) or CRD binary NCE (``form="nce"``) of synthetic
    anchors against real rows -> 0-d tensor in ``syn.dtype`` (see the module docstring for the formulas).

    syn [Ns, D], real [Nr, D] (same dtype and device), labels int64/int32 [Ns] / [Nr] (>= 0; < num_classes
    when it is given). Differentiable w.r.t. ``syn`` and ``real``; never builds the [Ns, Nr] matrix.
    ``validate`` checks label values and that every anchor has a positive (a host sync; skipped inside
    ``torch.compile``); ``check_finite`` also rejects NaN/Inf features.
    """
    _check_options(temperature, form, nce_constant, nce_negatives, backend)
    validate_infonce_inputs(syn, syn_labels, real, real_labels, num_classes=num_classes, check_values=validate,
                            check_finite=check_finite)
    c = None if nce_constant is None else float(nce_constant)
    name = resolve_backend(_OP, syn.device.type, backend)
    if name == "torch":
        return infonce_loss_reference(syn, syn_labels, real, real_labels, temperature=float(temperature), form=form,
                                      normalize=bool(normalize), nce_constant=c, nce_negatives=nce_negatives)
    return torch.ops.fastdd.infonce(syn, syn_labels, real, real_labels, float(temperature), form, bool(normalize),
                                    c, nce_negatives, name)[0]
