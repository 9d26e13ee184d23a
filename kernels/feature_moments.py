"""Triton kernels for the feature-moment op (``fastdd.ops.feature_moments``): kernels and launchers only.

No autograd and no dispatch live here; the op layer wraps the launchers in ``torch.library.triton_op``
(passing ``wrap=torch.library.wrap_triton``) and adds the backward.

Kernels (x is a contiguous feature map viewed as rows of P = H*W positions):

``_rows_kernel``        x [R, P] -> out [R, 4]: per row the mean mu and the biased central moments
                        m2, m3, m4 (m3 = m4 = 0 unless ORDER == 4). Two sweeps over the row (the second
                        one hits L2), block sums combined sequentially; fp32 accumulation (fp64 for
                        fp64 input).
``_class_map_kernel``   x [N, C, P], samples grouped by class (idx [N], offsets [K+1]) -> A [K, C, P]:
                        A[k,c,p] = mean over the class's samples of x[n,c,p] (segmented reduction, all
                        classes in one launch).
``_poly_kernel``        out[r,p] = c0 + c1 d + c2 d^2 + c3 d^3, d = src[s(r), p] - center[s(r)],
                        s(r) = idx[r] or r; coefficients per source row. Every closed-form gradient
                        of the op has this form, so the backward is one read of x (or A), one write of dx.
``_class_gram_kernel``  G[k] = scale[k] * sum_{n in class k} X_n X_n^T for X_n = x[n] as [C, P]: a
                        class-batched SYRK; only tiles on or above the diagonal are computed and mirrored.
``_gram_bwd_kernel``    dx[n] = S[label[n]] @ X_n for S [K, C, C] (the symmetrised, scaled Gram gradient).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "launch_rows",
    "launch_class_map",
    "launch_poly",
    "launch_class_gram",
    "launch_gram_backward",
]


def _identity(kernel):
    return kernel


@triton.jit
def _rows_kernel(x_ptr, out_ptr, R, P, ORDER: tl.constexpr, ACC_F64: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = rows < R
    cols = tl.arange(0, BLOCK_P)
    if ACC_F64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    s1 = tl.zeros([BLOCK_R], dtype=acc_t)
    for p0 in range(0, P, BLOCK_P):
        c = p0 + cols
        m = rmask[:, None] & (c[None, :] < P)
        v = tl.load(x_ptr + rows[:, None] * P + c[None, :], mask=m, other=0.0).to(acc_t)
        s1 += tl.sum(v, axis=1)
    mu = s1 / P
    s2 = tl.zeros([BLOCK_R], dtype=acc_t)
    s3 = tl.zeros([BLOCK_R], dtype=acc_t)
    s4 = tl.zeros([BLOCK_R], dtype=acc_t)
    for p0 in range(0, P, BLOCK_P):
        c = p0 + cols
        m = rmask[:, None] & (c[None, :] < P)
        v = tl.load(x_ptr + rows[:, None] * P + c[None, :], mask=m, other=0.0).to(acc_t)
        d = tl.where(m, v - mu[:, None], 0.0)
        d2 = d * d
        s2 += tl.sum(d2, axis=1)
        if ORDER == 4:
            s3 += tl.sum(d2 * d, axis=1)
            s4 += tl.sum(d2 * d2, axis=1)
    out = out_ptr + rows * 4
    tl.store(out + 0, mu, mask=rmask)
    tl.store(out + 1, s2 / P, mask=rmask)
    tl.store(out + 2, s3 / P, mask=rmask)
    tl.store(out + 3, s4 / P, mask=rmask)


@triton.jit
def _class_map_kernel(x_ptr, idx_ptr, off_ptr, a_ptr, C, P, ACC_F64: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_kc = tl.program_id(0)
    pid_p = tl.program_id(1)
    k = pid_kc // C
    c = pid_kc % C
    start = tl.load(off_ptr + k)
    end = tl.load(off_ptr + k + 1)
    cols = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m = cols < P
    if ACC_F64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    acc = tl.zeros([BLOCK_P], dtype=acc_t)
    for i in range(start, end):
        n = tl.load(idx_ptr + i).to(tl.int64)
        acc += tl.load(x_ptr + (n * C + c) * P + cols, mask=m, other=0.0).to(acc_t)
    cnt = (end - start).to(acc_t)
    tl.store(a_ptr + pid_kc.to(tl.int64) * P + cols, acc / cnt, mask=m)


@triton.jit
def _poly_kernel(src_ptr, idx_ptr, center_ptr, coef_ptr, out_ptr, R, P, HAS_IDX: tl.constexpr,
                 DEGREE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_p = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = rows < R
    cols = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m = rmask[:, None] & (cols[None, :] < P)
    if HAS_IDX:
        srows = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        srows = rows
    mu = tl.load(center_ptr + srows, mask=rmask, other=0.0)
    a0 = tl.load(coef_ptr + srows * 4 + 0, mask=rmask, other=0.0)
    a1 = tl.load(coef_ptr + srows * 4 + 1, mask=rmask, other=0.0)
    v = tl.load(src_ptr + srows[:, None] * P + cols[None, :], mask=m, other=0.0).to(mu.dtype)
    d = v - mu[:, None]
    if DEGREE == 3:
        a2 = tl.load(coef_ptr + srows * 4 + 2, mask=rmask, other=0.0)
        a3 = tl.load(coef_ptr + srows * 4 + 3, mask=rmask, other=0.0)
        res = a0[:, None] + d * (a1[:, None] + d * (a2[:, None] + d * a3[:, None]))
    else:
        res = a0[:, None] + a1[:, None] * d
    tl.store(out_ptr + rows[:, None] * P + cols[None, :], res.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _class_gram_kernel(x_ptr, idx_ptr, off_ptr, scale_ptr, g_ptr, C, P, IEEE: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    k = tl.program_id(0)
    pm = tl.program_id(1)
    pn = tl.program_id(2)
    if pm > pn:
        return
    rm = pm * BLOCK_C + tl.arange(0, BLOCK_C)
    rn = pn * BLOCK_C + tl.arange(0, BLOCK_C)
    cp = tl.arange(0, BLOCK_P)
    start = tl.load(off_ptr + k)
    end = tl.load(off_ptr + k + 1)
    acc = tl.zeros([BLOCK_C, BLOCK_C], dtype=tl.float32)
    for i in range(start, end):
        n = tl.load(idx_ptr + i).to(tl.int64)
        base = x_ptr + n * C * P
        for p0 in range(0, P, BLOCK_P):
            pc = p0 + cp
            a = tl.load(base + rm[:, None] * P + pc[None, :], mask=(rm[:, None] < C) & (pc[None, :] < P),
                        other=0.0)
            b = tl.load(base + rn[:, None] * P + pc[None, :], mask=(rn[:, None] < C) & (pc[None, :] < P),
                        other=0.0)
            if IEEE:
                acc += tl.dot(a, tl.trans(b), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(b))
    acc = acc * tl.load(scale_ptr + k)
    gk = g_ptr + k.to(tl.int64) * C * C
    mask = (rm[:, None] < C) & (rn[None, :] < C)
    tl.store(gk + rm[:, None] * C + rn[None, :], acc, mask=mask)
    if pm < pn:
        tl.store(gk + rn[None, :] * C + rm[:, None], acc, mask=mask)


@triton.jit
def _gram_bwd_kernel(s_ptr, x_ptr, lab_ptr, dx_ptr, C, P, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    pm = tl.program_id(1)
    pp = tl.program_id(2)
    k = tl.load(lab_ptr + n).to(tl.int64)
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    pc = pp * BLOCK_P + tl.arange(0, BLOCK_P)
    ck = tl.arange(0, BLOCK_K)
    sk = s_ptr + k * C * C
    xn = x_ptr + n * C * P
    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_K):
        cc = c0 + ck
        s = tl.load(sk + rm[:, None] * C + cc[None, :], mask=(rm[:, None] < C) & (cc[None, :] < C), other=0.0)
        xv = tl.load(xn + cc[:, None] * P + pc[None, :], mask=(cc[:, None] < C) & (pc[None, :] < P),
                     other=0.0).to(tl.float32)
        if IEEE:
            acc += tl.dot(s, xv, input_precision="ieee")
        else:
            acc += tl.dot(s, xv)
    mask = (rm[:, None] < C) & (pc[None, :] < P)
    tl.store(dx_ptr + n * C * P + rm[:, None] * P + pc[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ launchers
def _block_p(P: int, cap: int = 1024) -> int:
    return min(triton.next_power_of_2(max(P, 1)), cap)


def launch_rows(x: torch.Tensor, out: torch.Tensor, order: int, wrap=_identity) -> torch.Tensor:
    """Per-row moments. x: contiguous [R, P]; out: [R, 4] (float32, float64 for float64 x), filled
    with (mu, m2, m3, m4); ``order`` is 2 or 4."""
    R, P = x.shape
    block_p = _block_p(P)
    block_r = max(1, min(64, 4096 // block_p))
    grid = (triton.cdiv(R, block_r),)
    wrap(_rows_kernel)[grid](x, out, R, P, ORDER=order, ACC_F64=x.dtype == torch.float64,
                             BLOCK_R=block_r, BLOCK_P=block_p)
    return out


def launch_class_map(x: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor, amap: torch.Tensor,
                     wrap=_identity) -> torch.Tensor:
    """Batch-mean map per class. x: contiguous [N, C, P]; idx [N] int64 sample ids grouped by class;
    offsets [K+1] int64; amap: [K, C, P] output (float32, float64 for float64 x)."""
    N, C, P = x.shape
    K = offsets.shape[0] - 1
    block_p = _block_p(P)
    grid = (K * C, triton.cdiv(P, block_p))
    wrap(_class_map_kernel)[grid](x, idx, offsets, amap, C, P, ACC_F64=x.dtype == torch.float64,
                                  BLOCK_P=block_p)
    return amap


def launch_poly(src: torch.Tensor, idx, center: torch.Tensor, coef: torch.Tensor, out: torch.Tensor,
                degree: int, wrap=_identity) -> torch.Tensor:
    """out[r, :] = poly_{s(r)}(src[s(r), :] - center[s(r)]) with s(r) = idx[r] (or r when idx is None).

    src [Rs, P]; idx [R] int64 or None; center [Rs]; coef [Rs, 4]; out [R, P] (any float dtype)."""
    R, P = out.shape
    block_p = _block_p(P)
    block_r = max(1, min(64, 4096 // block_p))
    grid = (triton.cdiv(R, block_r), triton.cdiv(P, block_p))
    has_idx = idx is not None
    wrap(_poly_kernel)[grid](src, idx if has_idx else center, center, coef, out, R, P, HAS_IDX=has_idx,
                             DEGREE=degree, BLOCK_R=block_r, BLOCK_P=block_p)
    return out


def launch_class_gram(x: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor, scale: torch.Tensor,
                      gram: torch.Tensor, wrap=_identity) -> torch.Tensor:
    """gram[k] = scale[k] * sum over class k of X_n X_n^T. x: contiguous [N, C, P]; idx, offsets as in
    :func:`launch_class_map`; scale [K] float32; gram: [K, C, C] float32 output."""
    N, C, P = x.shape
    K = offsets.shape[0] - 1
    block_c = 32 if C <= 32 else 64
    block_p = 32
    nb = triton.cdiv(C, block_c)
    grid = (K, nb, nb)
    wrap(_class_gram_kernel)[grid](x, idx, offsets, scale, gram, C, P, IEEE=x.dtype == torch.float32,
                                   BLOCK_C=block_c, BLOCK_P=block_p)
    return gram


def launch_gram_backward(s: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, dx: torch.Tensor,
                         wrap=_identity) -> torch.Tensor:
    """dx[n] = s[labels[n]] @ x[n] for s [K, C, C] float32, x contiguous [N, C, P], labels [N] int64,
    dx [N, C, P] (x's dtype)."""
    N, C, P = x.shape
    block_m = 32 if C <= 32 else 64
    block_k = 32
    block_p = 64
    grid = (N, triton.cdiv(C, block_m), triton.cdiv(P, block_p))
    wrap(_gram_bwd_kernel)[grid](s, x, labels, dx, C, P, IEEE=x.dtype == torch.float32,
                                 BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_P=block_p)
    return dx
