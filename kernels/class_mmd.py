"""Triton kernels (and their launchers) for the per-class MMD op; dispatch and autograd live in
``fastdd/ops/class_mmd.py``, the C++/CUDA twins in ``csrc/class_mmd/``.

Shapes: real [Nr, D], syn [Ns, D] (fp32 / fp16 / bf16 on the GPU, fp64 too), labels int32/int64 with
values in [0, K) (the launchers trust them: the op layer validates). Every kernel accumulates in fp32
(fp64 for fp64 inputs), set by the ``ACC`` constexpr.

Rows are grouped by class once per call with a stable sort (``group_by_class``): ``perm`` lists the rows
of class 0, then class 1, ...; ``offsets[c]:offsets[c + 1]`` is class c's range in that order. Kernels
read rows through ``perm`` (no gathered copy of the features).

Linear MMD (all classes in one launch each way):
  ``_mean_diff_kernel``   grid (K, cdiv(D, BLOCK_D)): sums class c's real and synthetic rows over a block
                          of columns, writes diff[c] = mean_r[c] - mean_s[c] and the partial loss
                          sum_d diff^2 of its block.
  ``_mean_grad_kernel``   grid (cdiv(N, BLOCK_R), cdiv(D, BLOCK_D)): grad[i] = sign 2 g inv_n[c_i] diff[c_i].
  ``_segment_mean_kernel`` grid (K, cdiv(D, BLOCK_D)): class means of one input.
Gaussian MMD (tiled online reduction; the Nx x Ny kernel matrix is never stored):
  ``_pair_sum_kernel``    grid (cdiv(Nx, BLOCK_M),): one tile of class-sorted x rows against the tiles of
                          class-sorted y rows whose classes overlap the tile's; per pair of the same class
                          c adds w[c] * sum_b exp(-gamma_b ||x_i - y_j||^2), gamma_b = 1 / (2 sigma_b^2).
  ``_pair_grad_kernel``   same tiling; out[i] += coef[c] (sum_j W_ij x_i - sum_j W_ij y_j),
                          W_ij = sum_b 2 gamma_b exp(-gamma_b ||x_i - y_j||^2) (same-class pairs only).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from fastdd.kernels._common import acc_dtype, dot_tile, tl_acc


def _block_d(D: int, cap: int = 128) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(D, 1))))


def group_by_class(labels: torch.Tensor, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm int64 [N], sorted labels int32 [N], offsets int32 [K + 1]) with a stable sort (no host sync)."""
    sorted_labels, perm = torch.sort(labels.to(torch.int64), stable=True)
    bounds = torch.arange(num_classes + 1, device=labels.device, dtype=torch.int64)
    offsets = torch.searchsorted(sorted_labels, bounds).to(torch.int32)
    return perm, sorted_labels.to(torch.int32), offsets


# ----------------------------------------------------------------------------------------------- linear
@triton.jit
def _class_sum(x_ptr, perm_ptr, start, stop, stride, cols, cmask, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_D: tl.constexpr):
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    for r0 in range(start, stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < stop
        idx = tl.load(perm_ptr + rows, mask=rmask, other=0).to(tl.int64)
        x = tl.load(x_ptr + idx[:, None] * stride + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc += x.to(ACC)
    return tl.sum(acc, axis=0)


@triton.jit
def _mean_diff_kernel(real_ptr, real_perm_ptr, real_off_ptr, syn_ptr, syn_perm_ptr, syn_off_ptr,
                      diff_ptr, inv_nr_ptr, inv_ns_ptr, partial_ptr, D, stride_r, stride_s, n_dblocks,
                      ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    c = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    r0 = tl.load(real_off_ptr + c)
    r1 = tl.load(real_off_ptr + c + 1)
    s0 = tl.load(syn_off_ptr + c)
    s1 = tl.load(syn_off_ptr + c + 1)
    sum_r = _class_sum(real_ptr, real_perm_ptr, r0, r1, stride_r, cols, cmask, ACC, BLOCK_R, BLOCK_D)
    sum_s = _class_sum(syn_ptr, syn_perm_ptr, s0, s1, stride_s, cols, cmask, ACC, BLOCK_R, BLOCK_D)
    nr = (r1 - r0).to(ACC)
    ns = (s1 - s0).to(ACC)
    inv_r = tl.where(nr > 0, 1.0 / tl.maximum(nr, 1.0), 0.0).to(ACC)
    inv_s = tl.where(ns > 0, 1.0 / tl.maximum(ns, 1.0), 0.0).to(ACC)
    diff = sum_r * inv_r - sum_s * inv_s
    tl.store(diff_ptr + c.to(tl.int64) * D + cols, diff, mask=cmask)
    tl.store(partial_ptr + c * n_dblocks + pid_d, tl.sum(diff * diff, axis=0))
    if pid_d == 0:
        tl.store(inv_nr_ptr + c, inv_r)
        tl.store(inv_ns_ptr + c, inv_s)


@triton.jit
def _mean_grad_kernel(grad_ptr, diff_ptr, inv_ptr, labels_ptr, out_ptr, N, D, sign,
                      ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    mask = rmask[:, None] & (cols < D)[None, :]
    lab = tl.load(labels_ptr + rows, mask=rmask, other=0).to(tl.int64)
    g = tl.load(grad_ptr).to(ACC)
    coef = 2.0 * sign * g * tl.load(inv_ptr + lab, mask=rmask, other=0.0)
    d = tl.load(diff_ptr + lab[:, None] * D + cols[None, :], mask=mask, other=0.0)
    out = coef[:, None] * d
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_mean_kernel(x_ptr, perm_ptr, off_ptr, out_ptr, inv_ptr, D, stride,
                         ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    c = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    r0 = tl.load(off_ptr + c)
    r1 = tl.load(off_ptr + c + 1)
    s = _class_sum(x_ptr, perm_ptr, r0, r1, stride, cols, cmask, ACC, BLOCK_R, BLOCK_D)
    n = (r1 - r0).to(ACC)
    inv = tl.where(n > 0, 1.0 / tl.maximum(n, 1.0), 0.0).to(ACC)
    tl.store(out_ptr + c.to(tl.int64) * D + cols, (s * inv).to(out_ptr.dtype.element_ty), mask=cmask)
    if tl.program_id(1) == 0:
        tl.store(inv_ptr + c, inv)


def _check(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def class_mmd_forward(real: torch.Tensor, real_labels: torch.Tensor, syn: torch.Tensor, syn_labels: torch.Tensor,
                      num_classes: int, *, block_d: Optional[int] = None, block_r: int = 32):
    """(loss [] in real.dtype, diff [K, D], inv_nr [K], inv_ns [K]) with diff = mean_r - mean_s (acc dtype)."""
    real, syn = _check(real), _check(syn)
    K, D = num_classes, real.shape[1]
    acc = acc_dtype(real.dtype)
    perm_r, _, off_r = group_by_class(real_labels, K)
    perm_s, _, off_s = group_by_class(syn_labels, K)
    BLOCK_D = block_d or _block_d(D)
    n_db = triton.cdiv(D, BLOCK_D)
    diff = torch.empty((K, D), device=real.device, dtype=acc)
    inv_nr = torch.empty((K,), device=real.device, dtype=acc)
    inv_ns = torch.empty((K,), device=real.device, dtype=acc)
    partial = torch.empty((K, n_db), device=real.device, dtype=acc)
    _mean_diff_kernel[(K, n_db)](
        real, perm_r, off_r, syn, perm_s, off_s, diff, inv_nr, inv_ns, partial, D, real.stride(0), syn.stride(0),
        n_db, ACC=tl_acc(real.dtype), BLOCK_R=block_r, BLOCK_D=BLOCK_D,
    )
    loss = partial.sum().to(real.dtype)
    return loss, diff, inv_nr, inv_ns


def class_mmd_backward(grad: torch.Tensor, diff: torch.Tensor, inv_nr: torch.Tensor, inv_ns: torch.Tensor,
                       real_labels: torch.Tensor, syn_labels: torch.Tensor, need_real: bool, need_syn: bool,
                       dtype: torch.dtype, *, block_d: Optional[int] = None, block_r: int = 32):
    """(grad_real [Nr, D] or [0, D], grad_syn [Ns, D] or [0, D]) in ``dtype`` for the scalar ``grad``."""
    K, D = diff.shape
    diff = diff.contiguous()
    grad = grad.reshape(()).contiguous()
    BLOCK_D = block_d or _block_d(D)
    outs = []
    for labels, inv, sign, need in ((real_labels, inv_nr, 1.0, need_real), (syn_labels, inv_ns, -1.0, need_syn)):
        n = labels.shape[0] if need else 0
        out = torch.empty((n, D), device=diff.device, dtype=dtype)
        if n > 0 and D > 0:
            _mean_grad_kernel[(triton.cdiv(n, block_r), triton.cdiv(D, BLOCK_D))](
                grad, diff, inv.contiguous(), labels.contiguous(), out, n, D, sign,
                ACC=tl_acc(diff.dtype), BLOCK_R=block_r, BLOCK_D=BLOCK_D,
            )
        outs.append(out)
    return outs[0], outs[1]


def class_means(x: torch.Tensor, labels: torch.Tensor, num_classes: int, *, block_d: Optional[int] = None,
                block_r: int = 32):
    """(means [K, D] in x.dtype, inv_counts [K] acc dtype) by one segmented-mean launch."""
    x = _check(x)
    K, D = num_classes, x.shape[1]
    perm, _, off = group_by_class(labels, K)
    out = torch.empty((K, D), device=x.device, dtype=x.dtype)
    inv = torch.empty((K,), device=x.device, dtype=acc_dtype(x.dtype))
    BLOCK_D = block_d or _block_d(D)
    _segment_mean_kernel[(K, triton.cdiv(D, BLOCK_D))](
        x, perm, off, out, inv, D, x.stride(0), ACC=tl_acc(x.dtype), BLOCK_R=block_r, BLOCK_D=BLOCK_D,
    )
    return out, inv


# --------------------------------------------------------------------------------------------- Gaussian
@triton.jit
def _tile_setup(x_lab_ptr, y_off_ptr, pid, Nx, BLOCK_M: tl.constexpr):
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < Nx
    c_first = tl.load(x_lab_ptr + pid * BLOCK_M)
    c_last = tl.load(x_lab_ptr + tl.minimum(pid * BLOCK_M + BLOCK_M, Nx) - 1)
    lo = tl.load(y_off_ptr + c_first)
    hi = tl.load(y_off_ptr + c_last + 1)
    return rows, rmask, lo, hi


@triton.jit
def _row_norms(x_ptr, idx, rmask, D, stride, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.zeros([BLOCK_M], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + idx[:, None] * stride + cols[None, :], mask=rmask[:, None] & (cols < D)[None, :],
                    other=0.0).to(ACC)
        n += tl.sum(x * x, axis=1)
    return n


@triton.jit
def _tile_distances(x_ptr, xi, rmask, xn, cx, y_ptr, y_perm_ptr, y_lab_ptr, j0, hi, D, stride_x, stride_y,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Squared distances d2 [BLOCK_M, BLOCK_N] between this program's rows and the sorted y rows j0.., the
    same-class mask, the y row indices and their mask."""
    cols = j0 + tl.arange(0, BLOCK_N)
    cmask = cols < hi
    yj = tl.load(y_perm_ptr + cols, mask=cmask, other=0).to(tl.int64)
    cy = tl.load(y_lab_ptr + cols, mask=cmask, other=-2)
    gram, yn = dot_tile(x_ptr, xi, rmask, y_ptr, yj, cmask, D, stride_x, stride_y, ACC, BLOCK_M, BLOCK_N, BLOCK_D,
                        True)
    d2 = tl.maximum(xn[:, None] + yn[None, :] - 2.0 * gram, 0.0)
    same = (cx[:, None] == cy[None, :]) & rmask[:, None] & cmask[None, :]
    return d2, same, yj, cmask


@triton.jit
def _program_rows(x_ptr, x_perm_ptr, x_lab_ptr, y_off_ptr, Nx, D, stride_x, ACC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sorted x rows: (row mask, input indices, labels, squared norms, y range lo..hi)."""
    pid = tl.program_id(0)
    rows, rmask, lo, hi = _tile_setup(x_lab_ptr, y_off_ptr, pid, Nx, BLOCK_M)
    xi = tl.load(x_perm_ptr + rows, mask=rmask, other=0).to(tl.int64)
    cx = tl.load(x_lab_ptr + rows, mask=rmask, other=-1)
    xn = _row_norms(x_ptr, xi, rmask, D, stride_x, ACC, BLOCK_M, BLOCK_D)
    return rmask, xi, cx, xn, lo, hi


@triton.jit
def _pair_sum_kernel(x_ptr, x_perm_ptr, x_lab_ptr, y_ptr, y_perm_ptr, y_lab_ptr, y_off_ptr, w_ptr, gam_ptr,
                     out_ptr, Nx, D, stride_x, stride_y, NB: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rmask, xi, cx, xn, lo, hi = _program_rows(x_ptr, x_perm_ptr, x_lab_ptr, y_off_ptr, Nx, D, stride_x, ACC,
                                              BLOCK_M, BLOCK_D)
    total = tl.zeros([BLOCK_M], dtype=ACC)
    for j0 in range(lo, hi, BLOCK_N):
        d2, same, yj, cmask = _tile_distances(x_ptr, xi, rmask, xn, cx, y_ptr, y_perm_ptr, y_lab_ptr, j0, hi, D,
                                              stride_x, stride_y, ACC, BLOCK_M, BLOCK_N, BLOCK_D)
        k = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for b in tl.static_range(NB):
            k += tl.exp(-tl.load(gam_ptr + b) * d2)
        total += tl.sum(tl.where(same, k, 0.0), axis=1)
    w = tl.load(w_ptr + cx, mask=rmask, other=0.0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(total * w, axis=0))


@triton.jit
def _pair_grad_kernel(x_ptr, x_perm_ptr, x_lab_ptr, y_ptr, y_perm_ptr, y_lab_ptr, y_off_ptr, coef_ptr, gam_ptr,
                      out_ptr, Nx, D, stride_x, stride_y, NB: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rmask, xi, cx, xn, lo, hi = _program_rows(x_ptr, x_perm_ptr, x_lab_ptr, y_off_ptr, Nx, D, stride_x, ACC,
                                              BLOCK_M, BLOCK_D)
    coef = tl.load(coef_ptr + cx, mask=rmask, other=0.0)
    rowsum = tl.zeros([BLOCK_M], dtype=ACC)
    for j0 in range(lo, hi, BLOCK_N):
        d2, same, yj, cmask = _tile_distances(x_ptr, xi, rmask, xn, cx, y_ptr, y_perm_ptr, y_lab_ptr, j0, hi, D,
                                              stride_x, stride_y, ACC, BLOCK_M, BLOCK_N, BLOCK_D)
        w = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for b in tl.static_range(NB):
            gb = tl.load(gam_ptr + b)
            w += 2.0 * gb * tl.exp(-gb * d2)
        w = tl.where(same, w * coef[:, None], 0.0)
        rowsum += tl.sum(w, axis=1)
        # out[i] -= sum_j W_ij y_j, one block of columns at a time (each program owns its rows)
        for d0 in range(0, D, BLOCK_D):
            dcols = d0 + tl.arange(0, BLOCK_D)
            dmask = (dcols < D)[None, :]
            y = tl.load(y_ptr + yj[:, None] * stride_y + dcols[None, :], mask=cmask[:, None] & dmask,
                        other=0.0).to(ACC)
            if ACC == tl.float64:
                upd = tl.dot(w, y, out_dtype=ACC)
            else:
                upd = tl.dot(w, y, input_precision="ieee")
            optr = out_ptr + xi[:, None] * D + dcols[None, :]
            omask = rmask[:, None] & dmask
            tl.store(optr, tl.load(optr, mask=omask, other=0.0) - upd, mask=omask)
    # out[i] += (sum_j W_ij) x_i
    for d0 in range(0, D, BLOCK_D):
        dcols = d0 + tl.arange(0, BLOCK_D)
        dmask = (dcols < D)[None, :]
        omask = rmask[:, None] & dmask
        x = tl.load(x_ptr + xi[:, None] * stride_x + dcols[None, :], mask=omask, other=0.0).to(ACC)
        optr = out_ptr + xi[:, None] * D + dcols[None, :]
        tl.store(optr, tl.load(optr, mask=omask, other=0.0) + rowsum[:, None] * x, mask=omask)


def _gamma_tensor(bandwidths: Sequence[float], device, acc) -> torch.Tensor:
    return torch.tensor([1.0 / (2.0 * float(s) * float(s)) for s in bandwidths], device=device, dtype=acc)


def _gaussian_setup(real, real_labels, syn, syn_labels, num_classes: int, bandwidths: Sequence[float]):
    """Rows of both sides grouped by class, inverse class counts and gammas, in the accumulation dtype:
    (real, syn, groups_real, groups_syn, inv_r [K], inv_s [K], gamma [B], acc)."""
    real, syn = _check(real), _check(syn)
    acc = acc_dtype(real.dtype)
    groups = [group_by_class(labels, num_classes) for labels in (real_labels, syn_labels)]
    inv = []
    for _, _, offsets in groups:
        n = (offsets[1:] - offsets[:-1]).to(acc)
        inv.append(torch.where(n > 0, 1.0 / n.clamp_min(1), 0.0))
    return real, syn, groups[0], groups[1], inv[0], inv[1], _gamma_tensor(bandwidths, real.device, acc), acc


def _blocks(D: int, block_m: Optional[int], block_n: Optional[int], block_d: Optional[int], dtype):
    bd = block_d or _block_d(D, 32 if dtype in (torch.float32, torch.float64) else 64)
    return block_m or 64, block_n or 64, bd


def gaussian_class_mmd_forward(real, real_labels, syn, syn_labels, num_classes: int, bandwidths: Sequence[float],
                               *, block_m: Optional[int] = None, block_n: Optional[int] = None,
                               block_d: Optional[int] = None) -> torch.Tensor:
    """sum_c [mean k(r, r') + mean k(s, s') - 2 mean k(r, s)] over same-class pairs; 0-d, real.dtype."""
    real, syn, gr, gs, inv_r, inv_s, gam, acc = _gaussian_setup(real, real_labels, syn, syn_labels, num_classes,
                                                                 bandwidths)
    D = real.shape[1]
    BM, BN, BD = _blocks(D, block_m, block_n, block_d, real.dtype)
    total = torch.zeros((), device=real.device, dtype=acc)
    for (x, gx), (y, gy), w in (
        ((real, gr), (real, gr), inv_r * inv_r),
        ((syn, gs), (syn, gs), inv_s * inv_s),
        ((real, gr), (syn, gs), -2.0 * inv_r * inv_s),
    ):
        n = x.shape[0]
        if n == 0 or y.shape[0] == 0:
            continue
        grid = triton.cdiv(n, BM)
        partial = torch.empty((grid,), device=real.device, dtype=acc)
        _pair_sum_kernel[(grid,)](
            x, gx[0], gx[1], y, gy[0], gy[1], gy[2], w.contiguous(), gam, partial, n, D, x.stride(0), y.stride(0),
            NB=len(bandwidths), ACC=tl_acc(real.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
        )
        total = total + partial.sum()
    return total.to(real.dtype)


def gaussian_class_mmd_backward(grad, real, real_labels, syn, syn_labels, num_classes: int,
                                bandwidths: Sequence[float], need_real: bool, need_syn: bool, *,
                                block_m: Optional[int] = None, block_n: Optional[int] = None,
                                block_d: Optional[int] = None):
    """(grad_real [Nr, D] or [0, D], grad_syn [Ns, D] or [0, D]) in the input dtype."""
    real, syn, gr, gs, inv_r, inv_s, gam, acc = _gaussian_setup(real, real_labels, syn, syn_labels, num_classes,
                                                                 bandwidths)
    D = real.shape[1]
    g = grad.reshape(()).to(acc)
    BM, BN, BD = _blocks(D, block_m, block_n, block_d, real.dtype)
    # d/dx_i = sum over the two terms in which x appears of coef[c] (sum_j W_ij x_i - sum_j W_ij y_j)
    outs = []
    for need, x, gx, terms in (
        (need_real, real, gr, ((real, gr, -2.0 * g * inv_r * inv_r), (syn, gs, 2.0 * g * inv_r * inv_s))),
        (need_syn, syn, gs, ((syn, gs, -2.0 * g * inv_s * inv_s), (real, gr, 2.0 * g * inv_r * inv_s))),
    ):
        n = x.shape[0] if need else 0
        out = torch.zeros((n, D), device=x.device, dtype=acc)
        for y, gy, coef in terms:
            if n == 0 or y.shape[0] == 0 or D == 0:
                continue
            _pair_grad_kernel[(triton.cdiv(n, BM),)](
                x, gx[0], gx[1], y, gy[0], gy[1], gy[2], coef.contiguous(), gam, out, n, D, x.stride(0),
                y.stride(0), NB=len(bandwidths), ACC=tl_acc(real.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
            )
        outs.append(out.to(x.dtype))
    return outs[0], outs[1]
