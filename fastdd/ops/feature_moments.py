"""Batched feature-moment matching: DDM's moment (L_MM) and Gram (L_CM) losses, SRe2L/DWA BN statistics.

Notation: a feature map x is [N, C, H, W] with P = H*W positions, ``labels`` [N] in [0, K), n_k the number
of samples of class k. Statistics are float32 (float64 for float64 input) whatever the input dtype.

Per-class moments (:func:`class_moments`, spec ``ddm_mim4dd.md`` §1.4)
    ``mode="batchavg"`` (the published DDM estimator): A[k,c,p] = (1/n_k) sum_{n in k} x[n,c,p];
        mean[k,c] = (1/P) sum_p A[k,c,p];  std[k,c] = sqrt(v[k,c] + eps) with v the *unbiased* spatial
        variance (1/(P-1)) sum_p (A - mean)^2. For P = 1 the unbiased variance is undefined; we define
        v = 0, so std = sqrt(eps) and its gradient is zero.
    ``mode="persample"`` (the refactor's estimator): per sample mu[n,c] = (1/P) sum_p x,
        sd[n,c] = sqrt(m2[n,c] + eps) with m2 the *biased* spatial variance; mean[k,c] and std[k,c] are the
        class averages of mu and sd.
    ``higher=True`` adds the standardised third and fourth moments (biased central moments m3, m4):
        skew = m3 / (m2 + eps)^(3/2), kurt = m4 / (m2 + eps)^2 (not excess), per sample and class-averaged
        (persample) or of the class map A (batchavg, m2 biased there too).

Moment loss (:func:`moment_loss`, DDM L_MM, spec §1.4): per layer l and class k
    L[k,l] = 0.5 * ( E_m[k,l] + E_s[k,l] ),  E_m = mean_c (mean_s - mean_r)^2,  E_s = mean_c (std_s - std_r)^2
    with ``relative=True`` dividing E_m by (mean_c mean_r^2 + 1e-8) and E_s by (mean_c std_r^2 + 1e-8).
    loss = weight * (1/L) * sum_l w_l * sum_k L[k,l]  (w_l = ``layer_weights``, default 1).

Gram loss (:func:`gram_loss`, DDM L_CM, spec §1.5)
    Gbar[k] = (1/n_k) sum_{n in k} X_n X_n^T / (C*P)  (X_n = x[n] as [C, P]);
    loss = weight * (1/L) * sum_l w_l * sum_k ||Gbar_s[k] - Gbar_r[k]||_F^2.

BN-statistics loss (:func:`bn_stat_loss`, SRe2L/DWA, ``lowrank_dwa_theory.md`` §2.1)
    mean[c] and biased var[c] of x over (N, H, W); loss = ||mean - running_mean||_2 + ||var - running_var||_2
    (L2 norms, not squared; the subgradient at a zero difference is 0, as torch's norm).

Implementation. One pass over x computes per-row (row = one (n, c) or one class map (k, c)) mean and
central moments; everything else in the forward is [N, C]- or [K, C]-sized torch arithmetic. Every
gradient of these statistics with respect to x has the closed form

    dx[n,c,p] = c0 + c1*d + c2*d^2 + c3*d^3,   d = x[n,c,p] - mu[n,c]   (persample, BN)
              or d = A[k,c,p] - mean[k,c] with k = labels[n]         (batchavg)

with per-row coefficients built from the upstream gradient (the loss gradient) and the saved row
moments, so the backward is one elementwise pass (read x or the class map A, write dx). A channels_last
map (how a CPU teacher runs in SRe2L/DWA recover) is read in place for the BN statistics: the ``cpp``
column kernel (``feature_moments_cols``: one pass over x as [N*H*W, C], shifted sums in double over fixed row
blocks) and a one-pass ATen ``addcmul`` backward that writes dx channels_last; the other modes, and the
other backends' forward, make the map NCHW-contiguous first. Both custom ops are tagged
``flexible_layout``, so inductor hands them the layout its convolutions produce instead of copying. Backends
(:mod:`fastdd.ops._backend`): ``cpp`` (``csrc/feature_moments/feature_moments_cpu.cpp``, OpenMP; inner
loops in ``feature_moments_cpu_kernels.h`` built once per SIMD path, ``FASTDD_SIMD`` forces one; results are
bit-identical on every path and thread count),
``cuda`` (``csrc/feature_moments/feature_moments_cuda.cu``), ``triton`` (``kernels/feature_moments.py``),
``torch`` (the ``*_reference`` functions below, differentiated by autograd). The Gram matrices are a GEMM
(SYRK) problem: ``triton`` has a class-batched SYRK kernel and its backward GEMM kernel; ``cpp``, ``cuda``
and ``torch`` use ATen's BLAS/cuBLAS batched matmul, which a hand-written kernel would not beat.

Registration follows the op-layer rule (``fastdd/ops/README.md``): the backend is resolved in Python by
:func:`fastdd.ops._backend.resolve_backend` (once per call site at trace time under ``torch.compile``;
changing ``FASTDD_BACKEND`` afterwards does not retrace); ``torch`` calls the reference; ``cpp``, ``cuda``
and ``triton`` run inside the custom ops ``fastdd::feature_moments`` / ``fastdd::feature_moments_backward``
and (Triton only) ``fastdd::class_gram`` / ``fastdd::class_gram_backward``, with ``register_fake`` and
``register_autograd``, so ``torch.compile(fullgraph=True)`` sees no graph break.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..validation import check_tensor
from ._backend import resolve_backend, triton_kernels
from ._common import FLOAT_DTYPES, channels_last_only, check_backend_name, dispatch

__all__ = [
    "MODES",
    "class_moments",
    "class_moments_reference",
    "moment_loss",
    "moment_loss_reference",
    "class_gram",
    "class_gram_reference",
    "gram_loss",
    "gram_loss_reference",
    "bn_stats",
    "bn_stat_loss",
    "bn_stat_distance",
    "bn_stat_loss_reference",
    "validate_maps",
    "validate_class_labels",
]

MODES = ("batchavg", "persample")
_OP = "feature_moments"  # backend key: the native kernel torch.ops.fastdd_C.feature_moments
_REL_EPS = 1e-8


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ============================================================================================ references
def class_moments_reference(x: torch.Tensor, labels: torch.Tensor, num_classes: int, *, mode: str = "batchavg",
                            higher: bool = False, eps: float = 1e-5) -> Tuple[torch.Tensor, ...]:
    """Plain-torch per-class moments (the spec; differentiable by autograd, computed in x's dtype).

    x [N, C, H, W], labels [N] -> (mean [K, C], std [K, C]) or, with ``higher``, (mean, std, skew, kurt).
    Classes without samples give NaN. See the module docstring for the estimators.
    """
    N, C = x.shape[:2]
    P = x.shape[2] * x.shape[3]
    K = num_classes
    lab = labels.to(torch.int64)
    xf = x.reshape(N, C, P)
    counts = torch.zeros(K, dtype=x.dtype, device=x.device).index_add(0, lab, torch.ones(N, dtype=x.dtype,
                                                                                          device=x.device))
    if mode == "persample":
        mu = xf.mean(-1)
        m2 = xf.var(-1, correction=0)
        per = [mu, torch.sqrt(m2 + eps)]
        if higher:
            d = xf - mu.unsqueeze(-1)
            v = m2 + eps
            per += [(d ** 3).mean(-1) / v ** 1.5, (d ** 4).mean(-1) / v ** 2]
        zeros = torch.zeros(K, C, dtype=x.dtype, device=x.device)
        return tuple(zeros.index_add(0, lab, t) / counts.unsqueeze(1) for t in per)
    if mode == "batchavg":
        A = torch.zeros(K, C, P, dtype=x.dtype, device=x.device).index_add(0, lab, xf) / counts.view(K, 1, 1)
        mean = A.mean(-1)
        # P = 1: the unbiased variance is defined as 0 (kept in the graph, so its gradient is 0)
        var = A.var(-1, correction=1) if P > 1 else A.sum(-1) * 0.0
        out = [mean, torch.sqrt(var + eps)]
        if higher:
            d = A - mean.unsqueeze(-1)
            v = (d ** 2).mean(-1) + eps
            out += [(d ** 3).mean(-1) / v ** 1.5, (d ** 4).mean(-1) / v ** 2]
        return tuple(out)
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def _layer_weights(layer_weights, L: int) -> List[float]:
    if layer_weights is None:
        return [1.0] * L
    w = [float(v) for v in layer_weights]
    if len(w) != L:
        raise ValueError(f"layer_weights: expected {L} weights (one per layer), got {len(w)}")
    return w


def moment_loss_reference(syn_maps, syn_labels, real_stats, num_classes: int, *, mode: str = "batchavg",
                          relative: bool = False, eps: float = 1e-5, weight: float = 1.0,
                          layer_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """DDM L_MM in plain torch: weight * (1/L) sum_l w_l sum_k 0.5 (E_mean + E_std) (module docstring).

    syn_maps: list of [N, C_l, H_l, W_l]; syn_labels [N]; real_stats: list of (mean [K, C_l], std [K, C_l]).
    Returns a 0-d tensor.
    """
    maps = list(syn_maps) if isinstance(syn_maps, (list, tuple)) else [syn_maps]
    if isinstance(real_stats, tuple) and len(real_stats) == 2 and isinstance(real_stats[0], torch.Tensor):
        real_stats = [real_stats]
    w = _layer_weights(layer_weights, len(maps))
    total = 0.0
    for l, x in enumerate(maps):
        ms, ss = class_moments_reference(x, syn_labels, num_classes, mode=mode, eps=eps)
        mr, sr = (t.to(ms.dtype) for t in real_stats[l])
        em = (ms - mr).square().mean(1)
        es = (ss - sr).square().mean(1)
        if relative:
            em = em / (mr.square().mean(1) + _REL_EPS)
            es = es / (sr.square().mean(1) + _REL_EPS)
        total = total + w[l] * (0.5 * (em + es)).sum()
    return weight * total / len(maps)


def class_gram_reference(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean Gram matrix per class in plain torch: [K, C, C], Gbar[k] = mean_{n in k} X_n X_n^T / (C*P)."""
    N, C = x.shape[:2]
    P = x.shape[2] * x.shape[3]
    lab = labels.to(torch.int64)
    xf = x.reshape(N, C, P)
    g = torch.bmm(xf, xf.transpose(1, 2)) / (C * P)
    counts = torch.zeros(num_classes, dtype=x.dtype, device=x.device).index_add(
        0, lab, torch.ones(N, dtype=x.dtype, device=x.device))
    G = torch.zeros(num_classes, C, C, dtype=x.dtype, device=x.device).index_add(0, lab, g)
    return G / counts.view(-1, 1, 1)


def gram_loss_reference(syn_maps, syn_labels, real_grams, num_classes: int, *, weight: float = 1.0,
                        layer_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """DDM L_CM in plain torch: weight * (1/L) sum_l w_l sum_k ||Gbar_s[k] - Gbar_r[k]||_F^2 (0-d)."""
    maps = list(syn_maps) if isinstance(syn_maps, (list, tuple)) else [syn_maps]
    grams = list(real_grams) if isinstance(real_grams, (list, tuple)) else [real_grams]
    w = _layer_weights(layer_weights, len(maps))
    total = 0.0
    for l, x in enumerate(maps):
        gs = class_gram_reference(x, syn_labels, num_classes)
        total = total + w[l] * (gs - grams[l].to(gs.dtype)).square().sum()
    return weight * total / len(maps)


def bn_stat_loss_reference(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """SRe2L BN term in plain torch: ||mean - running_mean||_2 + ||var - running_var||_2 (0-d), with the
    per-channel mean and biased variance of x [N, C, H, W] over (N, H, W)."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return torch.linalg.vector_norm(mean - running_mean.to(mean.dtype)) + torch.linalg.vector_norm(
        var - running_var.to(var.dtype))


# ============================================================================================ validation
def validate_maps(name: str, maps, *, device=None, dtype=None) -> List[torch.Tensor]:
    """Check a feature map or a list of them: 4-d [N, C, H, W], floating, non-empty, one device and dtype.

    Returns the maps as a list. ``device`` / ``dtype`` (optional) are what every map must match.
    """
    single = isinstance(maps, torch.Tensor)
    if single:
        maps = [maps]
    if not isinstance(maps, (list, tuple)) or len(maps) == 0:
        raise ValueError(f"{name}: expected a tensor [N, C, H, W] or a non-empty list of them")
    out = []
    for i, x in enumerate(maps):
        label = name if single else f"{name}[{i}]"
        check_tensor(label, x, ndim=4, dtypes=FLOAT_DTYPES, nonempty=True)
        if device is None:
            device = x.device
        elif x.device != torch.device(device):
            raise ValueError(f"{label}: on device {x.device}, expected {device} (all maps on one device)")
        if dtype is None:
            dtype = x.dtype
        elif x.dtype != dtype:
            raise TypeError(f"{label}: dtype {x.dtype} differs from {dtype} (all maps must share one dtype)")
        if i > 0 and x.shape[0] != out[0].shape[0]:
            raise ValueError(f"{label}: has {x.shape[0]} samples but {name}[0] has {out[0].shape[0]}")
        out.append(x)
    return out


def validate_class_labels(name: str, labels, num_classes: int, n: int, device, *, values: bool = True,
                          require_all: bool = True, other=None, other_name: str = "") -> torch.Tensor:
    """Check labels [n] (int32/int64, on ``device``); with ``values`` also that they lie in
    [0, num_classes), given ``other`` (the already range-checked labels of the other side) that no class
    is present on one side only, and with ``require_all`` that every class has at least one sample.
    ``values=True`` synchronises with the device, so callers skip it under torch.compile."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    check_tensor(name, labels, ndim=1, dtypes=(torch.int64, torch.int32))
    if labels.shape[0] != n:
        raise ValueError(f"{name}: expected {n} labels (one per sample), got {labels.shape[0]}")
    if labels.device != torch.device(device):
        raise ValueError(f"{name}: on device {labels.device}, expected {device} (the maps' device)")
    if not values:
        return labels
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}), found range [{lo}, {hi}]")
    present = torch.bincount(labels.to(torch.int64), minlength=num_classes) > 0
    if other is not None:
        other_present = torch.bincount(other.to(torch.int64), minlength=num_classes) > 0
        only_other = (other_present & ~present).nonzero().flatten().tolist()
        if only_other:
            raise ValueError(f"{name}: class(es) {only_other} present in {other_name} but not in {name}")
        only_here = (present & ~other_present).nonzero().flatten().tolist()
        if only_here:
            raise ValueError(f"{other_name}: class(es) {only_here} present in {name} but not in {other_name}")
    empty = (~present).nonzero().flatten().tolist() if require_all else []
    if empty:
        raise ValueError(f"{name}: class(es) {empty} have no samples (every class in [0, {num_classes}) needs one)")
    return labels


def _dynamic_checks(validate: bool) -> bool:
    """Value checks (host sync) run when asked and not while torch.compile traces."""
    return validate and not _compiling()


def _check_mode(mode: str, eps: float) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")


# ============================================================================================ kernels glue
class _NativeKernels:
    """The C++ / CUDA kernels, registered by the extension as torch.ops.fastdd_C.feature_moments*."""

    @staticmethod
    def rows(x2d, order):
        return torch.ops.fastdd_C.feature_moments(x2d, order)

    @staticmethod
    def class_map(x3d, idx, offsets, order, save_map):
        return torch.ops.fastdd_C.feature_moments_class_map(x3d, idx, offsets, order, save_map)

    @staticmethod
    def cols(x2d):
        """[C, 2] column (mean, biased variance) of x2d [M, C] (CPU kernel; None where there is none)."""
        return torch.ops.fastdd_C.feature_moments_cols(x2d) if x2d.device.type == "cpu" else None

    @staticmethod
    def poly(src, idx, center, coef, degree, out_dtype):
        return torch.ops.fastdd_C.feature_moments_poly_backward(src, idx, center, coef, degree, out_dtype)

    @staticmethod
    def class_poly(amap, lab, order_idx, offsets, center, coef, degree, out_dtype):
        """dx [N, C, P] from the class map; class-major on the CPU (reads A once), row-indexed on CUDA."""
        K, C, P = amap.shape
        if amap.is_cuda:
            row_index = (lab.unsqueeze(1) * C + torch.arange(C, device=amap.device)).reshape(-1)
            return torch.ops.fastdd_C.feature_moments_poly_backward(
                amap.view(K * C, P), row_index, center, coef, degree, out_dtype).view(-1, C, P)
        return torch.ops.fastdd_C.feature_moments_class_map_backward(amap, order_idx, offsets, center, coef,
                                                                     degree, out_dtype)


class _TritonKernels:
    """The Triton launchers (``kernels/feature_moments.py``), launched directly inside the custom ops."""

    def __init__(self, module):
        self.m = module
        self.wrap = _launch_directly

    def rows(self, x2d, order):
        out = torch.empty((x2d.shape[0], 4), dtype=_stat_dtype(x2d.dtype), device=x2d.device)
        return self.m.launch_rows(x2d, out, order, wrap=self.wrap)

    def cols(self, x2d):
        return None  # no column kernel: the caller makes x NCHW-contiguous and uses the row kernel

    def class_map(self, x3d, idx, offsets, order, save_map):
        N, C, P = x3d.shape
        K = offsets.shape[0] - 1
        amap = torch.empty((K, C, P), dtype=_stat_dtype(x3d.dtype), device=x3d.device)
        self.m.launch_class_map(x3d, idx, offsets, amap, wrap=self.wrap)
        rowstats = self.rows(amap.view(K * C, P), order)
        if not save_map:
            amap = amap.new_empty((0,))
        return amap, rowstats

    def poly(self, src, idx, center, coef, degree, out_dtype):
        R = src.shape[0] if idx is None else idx.shape[0]
        out = torch.empty((R, src.shape[1]), dtype=out_dtype, device=src.device)
        return self.m.launch_poly(src, idx, center.contiguous(), coef.contiguous(), out, degree, wrap=self.wrap)

    def class_poly(self, amap, lab, order_idx, offsets, center, coef, degree, out_dtype):
        K, C, P = amap.shape
        row_index = (lab.unsqueeze(1) * C + torch.arange(C, device=amap.device)).reshape(-1)
        return self.poly(amap.view(K * C, P), row_index, center, coef, degree, out_dtype).view(-1, C, P)


def _launch_directly(kernel):
    return kernel


_KERNELS = {"cpp": lambda: _NativeKernels, "cuda": lambda: _NativeKernels,
            "triton": lambda: _TritonKernels(triton_kernels("feature_moments"))}


def _kernels(backend: str):
    """The kernel set (native or Triton) of a resolved backend name."""
    return dispatch(_KERNELS, backend, "feature_moments")()


# ============================================================================================ op bodies
def _class_counts(lab: torch.Tensor, K: int) -> torch.Tensor:
    """int64 [K] sample count per class (index_add: no data-dependent shape, compile-friendly)."""
    return torch.zeros(K, dtype=torch.int64, device=lab.device).index_add_(0, lab, torch.ones_like(lab))


def _group_by_class(lab: torch.Tensor, counts: torch.Tensor):
    idx = torch.argsort(lab, stable=True)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return idx, offsets


def _forward_body(kern, x, labels, num_classes, mode, higher, eps, save_map):
    """(mean [K,C], second [K,C], skew, kurt, rowstats [R,4] ([0] for pooled), amap) for each mode.

    ``second`` is std for the DDM modes and the biased variance for ``pooled`` (BN statistics over
    (N, H, W), num_classes == 1, labels unused)."""
    N, C, H, W = x.shape
    P = H * W
    K = num_classes
    sdt = _stat_dtype(x.dtype)
    order = 4 if higher else 2
    empty = lambda: x.new_empty((0,), dtype=sdt)  # noqa: E731
    if mode == "pooled" and channels_last_only(x):
        mv = kern.cols(x.permute(0, 2, 3, 1).reshape(N * P, C))  # a view: no copy
        if mv is not None:
            mean, var = (mv[:, j].unsqueeze(0).clone() for j in (0, 1))  # outputs may not alias each other
            return mean, var, empty(), empty(), empty(), empty()
    x = x.contiguous()
    if mode == "pooled":
        rs = kern.rows(x.view(N * C, P), 2).view(N, C, 4)
        mu, m2 = rs[..., 0], rs[..., 1]
        mean = mu.mean(0)
        var = (m2 + (mu - mean).square()).mean(0)
        return mean.unsqueeze(0), var.unsqueeze(0), empty(), empty(), empty(), empty()
    lab = labels.to(torch.int64)
    counts = _class_counts(lab, K)
    if mode == "persample":
        rs = kern.rows(x.view(N * C, P), order).view(N, C, 4)
        mu, m2, m3, m4 = rs.unbind(-1)
        v = m2 + eps
        per = [mu, torch.sqrt(v)]
        if higher:
            per += [m3 / v.pow(1.5), m4 / v.square()]
        inv = 1.0 / counts.to(sdt).unsqueeze(1)
        outs = [torch.zeros((K, C), dtype=sdt, device=x.device).index_add_(0, lab, t) * inv for t in per]
        if not higher:
            outs += [empty(), empty()]
        return (*outs, rs.view(N * C, 4), empty())
    # batchavg
    idx, offsets = _group_by_class(lab, counts)
    amap, rowstats = kern.class_map(x.view(N, C, P), idx, offsets, order, save_map)
    mu, m2, m3, m4 = rowstats.view(K, C, 4).unbind(-1)
    f = P / (P - 1) if P > 1 else 0.0
    std = torch.sqrt(m2 * f + eps)
    if higher:
        v = m2 + eps
        skew, kurt = m3 / v.pow(1.5), m4 / v.square()
    else:
        skew, kurt = empty(), empty()
    return mu.clone(), std, skew, kurt, rowstats, amap


def _backward_body(kern, g_mean, g_second, g_skew, g_kurt, x, labels, mean, rowstats, amap, num_classes,
                   mode, higher, eps):
    """dx for the forward of :func:`_forward_body`: per-row polynomial coefficients, then one pass."""
    N, C, H, W = x.shape
    P = H * W
    K = num_classes
    sdt = _stat_dtype(x.dtype)

    def grad_or_zero(g):
        return torch.zeros((K, C), dtype=sdt, device=x.device) if g is None else g.to(sdt)

    gm, gs = grad_or_zero(g_mean), grad_or_zero(g_second)
    if mode == "pooled" and channels_last_only(x):
        # dx = c0 + c1 (x - mean) per channel, written channels_last like x: one ATen pass, any backend
        c1 = 2.0 * gs.reshape(C) / (N * P)
        c0 = gm.reshape(C) / (N * P) - c1 * mean.reshape(C).to(sdt)
        shape = (1, C, 1, 1)  # in the statistics dtype (c0 and c1 x cancel: half coefficients lose the gradient)
        return torch.addcmul(c0.view(shape), x, c1.view(shape)).to(x.dtype)
    x = x.contiguous()
    rows = K * C if mode == "batchavg" else N * C
    if mode == "pooled":
        mu_c = mean.reshape(C).to(sdt)
        scale = 1.0 / (N * P)
        coef = torch.zeros((C, 4), dtype=sdt, device=x.device)
        coef[:, 0] = gm.reshape(C) * scale
        coef[:, 1] = 2.0 * gs.reshape(C) * scale
        center = mu_c.expand(N, C).reshape(N * C)
        coef = coef.expand(N, C, 4).reshape(N * C, 4)
        return kern.poly(x.view(N * C, P), None, center, coef, 1, x.dtype).view(N, C, H, W)

    lab = labels.to(torch.int64)
    counts = _class_counts(lab, K).to(sdt)
    rs = rowstats.view(rows, 4).to(sdt)
    mu, m2, m3, m4 = rs.unbind(-1)
    use_higher = higher and (g_skew is not None or g_kurt is not None)
    if mode == "persample":
        inv = (1.0 / counts)[lab].unsqueeze(1)  # [N, 1]
        gmu = (gm[lab] * inv).reshape(rows)
        gsd = (gs[lab] * inv).reshape(rows)
        g_m2 = gsd / (2.0 * torch.sqrt(m2 + eps))
        if use_higher:
            gk = (grad_or_zero(g_skew)[lab] * inv).reshape(rows)
            gq = (grad_or_zero(g_kurt)[lab] * inv).reshape(rows)
    else:  # batchavg: coefficients per class row (k, c), 1/n_k of dA/dx folded in
        inv = (1.0 / counts).unsqueeze(1)  # [K, 1]
        gmu = (gm * inv).reshape(rows)
        gsd = (gs * inv).reshape(rows)
        f = P / (P - 1) if P > 1 else 0.0
        g_m2 = gsd * f / (2.0 * torch.sqrt(m2 * f + eps))
        if use_higher:
            gk = (grad_or_zero(g_skew) * inv).reshape(rows)
            gq = (grad_or_zero(g_kurt) * inv).reshape(rows)
    if use_higher:
        v = m2 + eps
        g_m3 = gk / v.pow(1.5)
        g_m4 = gq / v.square()
        g_m2 = g_m2 - 1.5 * gk * m3 / v.pow(2.5) - 2.0 * gq * m4 / v.pow(3)
        coef = torch.stack([(gmu - 3.0 * g_m3 * m2 - 4.0 * g_m4 * m3) / P, 2.0 * g_m2 / P, 3.0 * g_m3 / P,
                            4.0 * g_m4 / P], dim=1)
        degree = 3
    else:
        zero = torch.zeros_like(gmu)
        coef = torch.stack([gmu / P, 2.0 * g_m2 / P, zero, zero], dim=1)
        degree = 1
    if mode == "persample":
        dx = kern.poly(x.view(N * C, P), None, mu.contiguous(), coef, degree, x.dtype)
    else:
        if amap.numel() == 0:
            raise RuntimeError("feature_moments: backward of mode='batchavg' needs the class map; the forward "
                               "ran with save_map=False")
        order_idx, offsets = _group_by_class(lab, _class_counts(lab, K))
        dx = kern.class_poly(amap.view(K, C, P), lab, order_idx, offsets, mu.contiguous(), coef, degree, x.dtype)
    return dx.view(N, C, H, W)


def _fake_forward(x, labels, num_classes, mode, higher, eps, save_map):
    N, C, H, W = x.shape
    K = num_classes
    sdt = _stat_dtype(x.dtype)
    new = lambda *s: x.new_empty(s, dtype=sdt)  # noqa: E731
    hk = (K, C) if higher and mode != "pooled" else (0,)
    rows = (K * C if mode == "batchavg" else N * C, 4) if mode != "pooled" else (0,)  # pooled: bwd needs the mean
    amap = (K, C, H * W) if (mode == "batchavg" and save_map) else (0,)
    return new(K, C), new(K, C), new(*hk), new(*hk), new(*rows), new(*amap)


_SCHEMA_OUT = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("fastdd::feature_moments", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _fm_op(x: torch.Tensor, labels: torch.Tensor, num_classes: int, mode: str, higher: bool, eps: float,
           save_map: bool, backend: str) -> _SCHEMA_OUT:
    """Forward on the resolved ``backend`` (cpp, cuda or triton); see :func:`_forward_body` for the outputs."""
    return _forward_body(_kernels(backend), x, labels, num_classes, mode, higher, eps, save_map)


@_fm_op.register_fake
def _(x, labels, num_classes, mode, higher, eps, save_map, backend):
    return _fake_forward(x, labels, num_classes, mode, higher, eps, save_map)


@torch.library.custom_op("fastdd::feature_moments_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _fm_bwd_op(g_mean: Optional[torch.Tensor], g_second: Optional[torch.Tensor],
               g_skew: Optional[torch.Tensor], g_kurt: Optional[torch.Tensor], x: torch.Tensor,
               labels: torch.Tensor, mean: torch.Tensor, rowstats: torch.Tensor, amap: torch.Tensor,
               num_classes: int, mode: str, higher: bool, eps: float, backend: str) -> torch.Tensor:
    """Backward: dx [N, C, H, W] (x's dtype) in one elementwise pass."""
    return _backward_body(_kernels(backend), g_mean, g_second, g_skew, g_kurt, x, labels, mean, rowstats, amap,
                          num_classes, mode, higher, eps)


@_fm_bwd_op.register_fake
def _(g_mean, g_second, g_skew, g_kurt, x, labels, mean, rowstats, amap, num_classes, mode, higher, eps, backend):
    cl = mode == "pooled" and channels_last_only(x)
    return torch.empty_like(x, memory_format=torch.channels_last if cl else torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, labels, num_classes, mode, higher, eps, save_map, backend = inputs
    mean, _second, _skew, _kurt, rowstats, amap = output
    ctx.save_for_backward(x, labels, mean, rowstats, amap)
    ctx.args = (num_classes, mode, higher, eps, backend)


def _fm_backward(ctx, g_mean, g_second, g_skew, g_kurt, _g_rowstats, _g_amap):
    x, labels, mean, rowstats, amap = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        dx = _fm_bwd_op(g_mean, g_second, g_skew, g_kurt, x, labels, mean, rowstats, amap, *ctx.args)
    return dx, None, None, None, None, None, None, None


_fm_op.register_autograd(_fm_backward, setup_context=_setup_context)


@torch.library.custom_op("fastdd::class_gram", mutates_args=())
def _gram_op(x: torch.Tensor, labels: torch.Tensor, num_classes: int, backend: str) -> torch.Tensor:
    """Mean Gram matrix per class [K, C, C] float32 from the Triton class-batched SYRK (``backend`` triton)."""
    module = dispatch({"triton": lambda: triton_kernels("feature_moments")}, backend, "class_gram")()
    N, C, H, W = x.shape
    P = H * W
    lab = labels.to(torch.int64)
    counts = _class_counts(lab, num_classes)
    idx, offsets = _group_by_class(lab, counts)
    scale = 1.0 / (counts.to(torch.float32) * (C * P))
    gram = torch.empty((num_classes, C, C), dtype=torch.float32, device=x.device)
    module.launch_class_gram(x.contiguous().view(N, C, P), idx, offsets, scale, gram, wrap=_launch_directly)
    return gram


@_gram_op.register_fake
def _(x, labels, num_classes, backend):
    return x.new_empty((num_classes, x.shape[1], x.shape[1]), dtype=torch.float32)


@torch.library.custom_op("fastdd::class_gram_backward", mutates_args=())
def _gram_bwd_op(grad: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 backend: str) -> torch.Tensor:
    """dx [N, C, H, W] of the class Gram matrices (the Triton GEMM kernel)."""
    module = dispatch({"triton": lambda: triton_kernels("feature_moments")}, backend, "class_gram_backward")()
    N, C, H, W = x.shape
    P = H * W
    lab = labels.to(torch.int64)
    counts = _class_counts(lab, num_classes).to(torch.float32)
    g = grad.to(torch.float32)
    s = ((g + g.transpose(1, 2)) / (counts * (C * P)).view(-1, 1, 1)).contiguous()
    dx = torch.empty((N, C, P), dtype=x.dtype, device=x.device)
    module.launch_gram_backward(s, x.contiguous().view(N, C, P), lab, dx, wrap=_launch_directly)
    return dx.view(N, C, H, W)


@_gram_bwd_op.register_fake
def _(grad, x, labels, num_classes, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _gram_setup(ctx, inputs, output):
    x, labels, num_classes, backend = inputs
    ctx.save_for_backward(x, labels)
    ctx.num_classes, ctx.backend = num_classes, backend


def _gram_backward(ctx, grad):
    x, labels = ctx.saved_tensors
    dx = _gram_bwd_op(grad, x, labels, ctx.num_classes, ctx.backend) if ctx.needs_input_grad[0] else None
    return dx, None, None, None


_gram_op.register_autograd(_gram_backward, setup_context=_gram_setup)


# ============================================================================================ dispatch
def _resolve(device_type: str, backend: Optional[str]) -> str:
    check_backend_name(backend)
    return resolve_backend(_OP, device_type, backend)


def _moments(x, labels, num_classes, mode, higher, eps, backend):
    """Dispatch the per-class moments of one map; returns (mean, std[, skew, kurt]) in the stat dtype."""
    name = _resolve(x.device.type, backend)
    if name == "torch":
        out = class_moments_reference(x.to(_stat_dtype(x.dtype)) if x.dtype in (torch.float16, torch.bfloat16)
                                      else x, labels, num_classes, mode=mode, higher=higher, eps=eps)
        return out
    save_map = mode == "batchavg" and torch.is_grad_enabled() and x.requires_grad
    out = _fm_op(x, labels, num_classes, mode, higher, float(eps), save_map, name)
    return tuple(out[:4]) if higher else tuple(out[:2])


def class_moments(x: torch.Tensor, labels: torch.Tensor, num_classes: int, *, mode: str = "batchavg",
                  higher: bool = False, eps: float = 1e-5, backend: Optional[str] = None,
                  validate: bool = True) -> Tuple[torch.Tensor, ...]:
    """Per-class, per-channel moments of a feature map in one pass (module docstring for the estimators).

    x [N, C, H, W] (float16/bfloat16/float32/float64), labels [N] int in [0, num_classes), every class
    present. Returns (mean [K, C], std [K, C]) or, with ``higher``, (mean, std, skew, kurt), float32
    (float64 for float64 x). Differentiable with respect to x (closed-form single-pass backward).
    Shape / dtype / device checks always run; ``validate`` adds the label-value checks (host sync,
    skipped under torch.compile).
    """
    _check_mode(mode, eps)
    x = validate_maps("x", x)[0]
    validate_class_labels("labels", labels, num_classes, x.shape[0], x.device, values=_dynamic_checks(validate))
    return _moments(x, labels, num_classes, mode, higher, eps, backend)


def _as_layers(name: str, value, n_layers: int, is_entry) -> list:
    if is_entry(value):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) != n_layers:
        got = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(f"{name}: expected {n_layers} entries (one per layer of syn_maps), got {got}")
    return list(value)


def _is_stat_pair(v) -> bool:
    return isinstance(v, tuple) and len(v) == 2 and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in v)


def moment_loss(syn_maps, syn_labels: torch.Tensor, real_stats, num_classes: int, *, mode: str = "batchavg",
                relative: bool = False, eps: float = 1e-5, weight: float = 1.0,
                layer_weights: Optional[Sequence[float]] = None, backend: Optional[str] = None,
                validate: bool = True) -> torch.Tensor:
    """DDM moment-matching loss L_MM over several layers (0-d, float32 or float64; module docstring).

    syn_maps: one [N, C_l, H_l, W_l] tensor or a list (layers may differ in C/H/W, share N);
    syn_labels [N]; real_stats: list of (mean [K, C_l], std [K, C_l]) per layer, e.g. from
    :func:`class_moments` on the real maps (no grad needed). Gradients flow to the maps (one fused pass
    per layer) and, by autograd, to the real statistics.
    """
    _check_mode(mode, eps)
    maps = validate_maps("syn_maps", syn_maps)
    validate_class_labels("syn_labels", syn_labels, num_classes, maps[0].shape[0], maps[0].device,
                          values=_dynamic_checks(validate))
    real_stats = _as_layers("real_stats", real_stats, len(maps), _is_stat_pair)
    for l, (x, st) in enumerate(zip(maps, real_stats)):
        if not isinstance(st, (list, tuple)) or len(st) != 2:
            raise ValueError(f"real_stats[{l}]: expected a (mean, std) pair")
        for j, t in enumerate(st):
            check_tensor(f"real_stats[{l}][{j}]", t, shape=(num_classes, x.shape[1]), dtypes=FLOAT_DTYPES,
                         device=x.device)
    w = _layer_weights(layer_weights, len(maps))
    total = None
    for l, x in enumerate(maps):
        ms, ss = _moments(x, syn_labels, num_classes, mode, False, eps, backend)
        mr, sr = real_stats[l]
        mr, sr = mr.to(ms.dtype), sr.to(ms.dtype)
        em = (ms - mr).square().mean(1)
        es = (ss - sr).square().mean(1)
        if relative:
            em = em / (mr.square().mean(1) + _REL_EPS)
            es = es / (sr.square().mean(1) + _REL_EPS)
        term = (0.5 * w[l]) * (em + es).sum()
        total = term if total is None else total + term
    return total * (weight / len(maps))


def _gram(x, labels, num_classes, backend):
    name = _resolve(x.device.type, backend)
    if name == "triton" and x.dtype != torch.float64:
        return _gram_op(x, labels, num_classes, name)
    # cpp / cuda / torch (and float64 on triton): the Gram is a GEMM; ATen's BLAS / cuBLAS bmm is the kernel.
    xs = x if x.dtype == _stat_dtype(x.dtype) else x.to(_stat_dtype(x.dtype))
    return class_gram_reference(xs, labels, num_classes)


def class_gram(x: torch.Tensor, labels: torch.Tensor, num_classes: int, *, backend: Optional[str] = None,
               validate: bool = True) -> torch.Tensor:
    """Mean Gram matrix per class: [K, C, C], Gbar[k] = mean_{n in k} X_n X_n^T / (C*P) (X_n = x[n] as [C, P]).

    x [N, C, H, W], labels [N]. float32 result (float64 for float64 x). Differentiable.
    """
    x = validate_maps("x", x)[0]
    validate_class_labels("labels", labels, num_classes, x.shape[0], x.device, values=_dynamic_checks(validate))
    return _gram(x, labels, num_classes, backend)


def gram_loss(syn_maps, syn_labels: torch.Tensor, real_grams, num_classes: int, *, weight: float = 1.0,
              layer_weights: Optional[Sequence[float]] = None, backend: Optional[str] = None,
              validate: bool = True) -> torch.Tensor:
    """DDM correlation loss L_CM: weight * (1/L) sum_l w_l sum_k ||Gbar_s[k] - Gbar_r[k]||_F^2 (0-d).

    syn_maps: [N, C_l, H_l, W_l] or a list; real_grams: list of [K, C_l, C_l] (e.g. :func:`class_gram`)."""
    maps = validate_maps("syn_maps", syn_maps)
    validate_class_labels("syn_labels", syn_labels, num_classes, maps[0].shape[0], maps[0].device,
                          values=_dynamic_checks(validate))
    real_grams = _as_layers("real_grams", real_grams, len(maps), lambda v: isinstance(v, torch.Tensor))
    for l, (x, g) in enumerate(zip(maps, real_grams)):
        check_tensor(f"real_grams[{l}]", g, shape=(num_classes, x.shape[1], x.shape[1]), dtypes=FLOAT_DTYPES,
                     device=x.device)
    w = _layer_weights(layer_weights, len(maps))
    total = None
    for l, x in enumerate(maps):
        gs = _gram(x, syn_labels, num_classes, backend)
        term = w[l] * (gs - real_grams[l].to(gs.dtype)).square().sum()
        total = term if total is None else total + term
    return total * (weight / len(maps))


def bn_stats(x: torch.Tensor, *, backend: Optional[str] = None):
    """Per-channel batch mean and biased variance over (N, H, W), as BatchNorm computes them.

    x [N, C, H, W] -> (mean [C], var [C]), float32 (float64 for float64 x); differentiable (one-pass
    forward, one-pass closed-form backward)."""
    x = validate_maps("x", x)[0]
    name = _resolve(x.device.type, backend)
    if name == "torch":
        xs = x if x.dtype == _stat_dtype(x.dtype) else x.to(_stat_dtype(x.dtype))
        var, mean = torch.var_mean(xs, dim=(0, 2, 3), correction=0)
        return mean, var
    labels = torch.zeros((0,), dtype=torch.int64, device=x.device)
    out = _fm_op(x, labels, 1, "pooled", False, 0.0, False, name)
    return out[0].view(-1), out[1].view(-1)


def bn_stat_loss(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, *,
                 var_weight: float = 1.0, backend: Optional[str] = None) -> torch.Tensor:
    """SRe2L/DWA BN-statistics term of one layer: ||mean - running_mean||_2 + var_weight * ||var - running_var||_2
    (0-d; ``var_weight`` is DWA's decoupled ``r_var``, 1 for SRe2L).

    x [N, C, H, W] is the input of the BatchNorm layer; running_mean, running_var [C]. mean / var are the
    batch statistics over (N, H, W), biased variance. Multiply by the layer's multiplier outside."""
    x = validate_maps("x", x)[0]
    C = x.shape[1]
    check_tensor("running_mean", running_mean, shape=(C,), dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("running_var", running_var, shape=(C,), dtypes=FLOAT_DTYPES, device=x.device)
    return bn_stat_distance(*bn_stats(x, backend=backend), running_mean, running_var, var_weight)


def bn_stat_distance(mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                     var_weight: float = 1.0) -> torch.Tensor:
    """The BN-statistics term from batch statistics mean, var [C] (0-d, their dtype):
    ||mean - running_mean||_2 + var_weight * ||var - running_var||_2."""
    return torch.linalg.vector_norm(mean - running_mean.to(mean.dtype)) + var_weight * torch.linalg.vector_norm(
        var - running_var.to(var.dtype))
