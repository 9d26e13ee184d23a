"""Triton kernels (and their launchers) for the InfoNCE op; dispatch, weights, normalisation and autograd
live in ``fastdd/ops/infonce.py``, the C++/CUDA twins in ``csrc/infonce/``.

Shapes: syn [Ns, D], real [Nr, D] (fp32 / fp16 / bf16 on the GPU, fp64 too), labels int32/int64,
syn_scale [Ns] / real_scale [Nr] (z = scale * x), weights [2, Ns], logc [Ns], lse [Ns] (accumulation
dtype: fp32, fp64 for fp64 inputs, set by the ``ACC`` constexpr). ``s_ij = z_s_i . z_r_j / tau``;
``pos_ij = [syn_labels_i == real_labels_j]``; FORM 0 = supcon, 1 = nce (formulas in the op module).

``_fwd_kernel``  grid (cdiv(Ns, BLOCK_M),): one block of anchors against every [BLOCK_M, BLOCK_N] tile
                 of real rows (dot products accumulated over BLOCK_D feature chunks); online max / sum of
                 exponentials (FORM 0) or softplus sums (FORM 1) per anchor; writes lse and the anchor's
                 loss term. S is never stored.
``_bwd_kernel``  grid (cdiv(Na, BLOCK_M),): one block of output rows ``a`` (syn rows for dZ_s, real rows
                 for dZ_r) against every tile of the other side ``b``: recompute the tile, form dS (the
                 per-anchor statistics come from the rows when a = syn, from the columns when a = real),
                 then ``out[a] += (dS * scale_b / tau) @ b`` chunk by chunk of BLOCK_D features (each
                 program owns its output rows: no atomics, deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdd.kernels._common import acc_dtype, dot_tile, tl_acc


def _blocks(D: int, dtype: torch.dtype):
    cap = 32 if dtype in (torch.float32, torch.float64) else 64
    bd = max(16, min(cap, triton.next_power_of_2(max(D, 1))))
    return 32, 64, bd


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _fwd_kernel(s_ptr, sl_ptr, ss_ptr, r_ptr, rl_ptr, rs_ptr, w_ptr, logc_ptr, row_ptr, lse_ptr, Ns, Nr, D,
                stride_s, stride_r, inv_tau, FORM: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < Ns
    ri = rows.to(tl.int64)
    lab = tl.load(sl_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    a = tl.load(ss_ptr + rows, mask=rmask, other=0.0).to(ACC) * inv_tau
    v = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(ACC)
    u = tl.load(w_ptr + Ns + rows, mask=rmask, other=0.0).to(ACC)
    lc = tl.load(logc_ptr + rows, mask=rmask, other=0.0).to(ACC)
    m = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l = tl.zeros([BLOCK_M], dtype=ACC)
    t_pos = tl.zeros([BLOCK_M], dtype=ACC)
    t_neg = tl.zeros([BLOCK_M], dtype=ACC)
    for j0 in range(0, Nr, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < Nr
        labc = tl.load(rl_ptr + cols, mask=cmask, other=-2).to(tl.int64)
        b = tl.load(rs_ptr + cols, mask=cmask, other=0.0).to(ACC)
        dots, _ = dot_tile(s_ptr, ri, rmask, r_ptr, cols.to(tl.int64), cmask, D, stride_s, stride_r, ACC,
                           BLOCK_M, BLOCK_N, BLOCK_D, False)
        s = dots * a[:, None] * b[None, :]
        pos = (lab[:, None] == labc[None, :]) & cmask[None, :]
        if FORM == 0:
            s = tl.where(cmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m = m_new
            t_pos += tl.sum(tl.where(pos, s, 0.0), axis=1)
        else:
            neg = (lab[:, None] != labc[None, :]) & cmask[None, :]
            t_pos += tl.sum(tl.where(pos, _softplus(lc[:, None] - s), 0.0), axis=1)
            t_neg += tl.sum(tl.where(neg, _softplus(s - lc[:, None]), 0.0), axis=1)
    if FORM == 0:
        lse = m + tl.log(l)
        row = u * lse - v * t_pos
    else:
        lse = tl.zeros([BLOCK_M], dtype=ACC)
        row = v * t_pos + u * t_neg
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(row_ptr + rows, row, mask=rmask)


@triton.jit
def _bwd_kernel(a_ptr, al_ptr, as_ptr, b_ptr, bl_ptr, bs_ptr, w_ptr, logc_ptr, lse_ptr, out_ptr, Na, Nb, D,
                Ns, stride_a, stride_b, inv_tau, SYN_ROWS: tl.constexpr, FORM: tl.constexpr, ACC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < Na
    ri = rows.to(tl.int64)
    lab = tl.load(al_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    sa = tl.load(as_ptr + rows, mask=rmask, other=0.0).to(ACC)
    if SYN_ROWS:
        v_r = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(ACC)
        u_r = tl.load(w_ptr + Ns + rows, mask=rmask, other=0.0).to(ACC)
        lc_r = tl.load(logc_ptr + rows, mask=rmask, other=0.0).to(ACC)
        lse_r = tl.load(lse_ptr + rows, mask=rmask, other=0.0).to(ACC)
    for j0 in range(0, Nb, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < Nb
        cj = cols.to(tl.int64)
        labc = tl.load(bl_ptr + cols, mask=cmask, other=-2).to(tl.int64)
        sb = tl.load(bs_ptr + cols, mask=cmask, other=0.0).to(ACC)
        dots, _ = dot_tile(a_ptr, ri, rmask, b_ptr, cj, cmask, D, stride_a, stride_b, ACC, BLOCK_M, BLOCK_N,
                           BLOCK_D, False)
        s = dots * (sa * inv_tau)[:, None] * sb[None, :]
        if SYN_ROWS:
            v = v_r[:, None]
            u = u_r[:, None]
            lc = lc_r[:, None]
            lse = lse_r[:, None]
        else:
            v = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
            u = tl.load(w_ptr + Ns + cols, mask=cmask, other=0.0).to(ACC)[None, :]
            lc = tl.load(logc_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
            lse = tl.load(lse_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        valid = rmask[:, None] & cmask[None, :]
        pos = lab[:, None] == labc[None, :]
        if FORM == 0:
            ds = u * tl.exp(s - lse) - tl.where(pos, v, 0.0)
        else:
            h = 1.0 / (1.0 + tl.exp(lc - s))
            ds = tl.where(pos, -v * (1.0 - h), u * h)
        p = tl.where(valid, ds * (sb * inv_tau)[None, :], 0.0)
        for d0 in range(0, D, BLOCK_D):
            dcols = d0 + tl.arange(0, BLOCK_D)
            dmask = (dcols < D)[None, :]
            bt = tl.load(b_ptr + cj[:, None] * stride_b + dcols[None, :], mask=cmask[:, None] & dmask, other=0.0)
            if ACC == tl.float64:
                upd = tl.dot(p, bt.to(ACC), out_dtype=ACC)
            elif bt.dtype == tl.float32:
                upd = tl.dot(p, bt, input_precision="ieee")
            else:
                upd = tl.dot(p, bt.to(tl.float32), input_precision="tf32")
            optr = out_ptr + ri[:, None] * D + dcols[None, :]
            omask = rmask[:, None] & dmask
            tl.store(optr, tl.load(optr, mask=omask, other=0.0) + upd, mask=omask)


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def infonce_forward(syn, syn_labels, real, real_labels, syn_scale, real_scale, weights, logc, temperature: float,
                    form: int):
    """(row_loss [Ns], lse [Ns]) in the accumulation dtype."""
    syn, real = _rowmajor(syn), _rowmajor(real)
    Ns, Nr, D = syn.shape[0], real.shape[0], syn.shape[1]
    acc = acc_dtype(syn.dtype)
    BM, BN, BD = _blocks(D, syn.dtype)
    row = torch.empty((Ns,), device=syn.device, dtype=acc)
    lse = torch.empty((Ns,), device=syn.device, dtype=acc)
    _fwd_kernel[(triton.cdiv(Ns, BM),)](
        syn, syn_labels.contiguous(), syn_scale.to(acc).contiguous(), real, real_labels.contiguous(),
        real_scale.to(acc).contiguous(), weights.to(acc).contiguous(), logc.to(acc).contiguous(), row, lse,
        Ns, Nr, D, syn.stride(0), real.stride(0), 1.0 / temperature,
        FORM=form, ACC=tl_acc(syn.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
    )
    return row, lse


def infonce_backward(syn, syn_labels, real, real_labels, syn_scale, real_scale, weights, logc, lse,
                     temperature: float, form: int, need_syn: bool, need_real: bool):
    """(dz_syn [Ns, D] or [0, D], dz_real [Nr, D] or [0, D]) in the accumulation dtype (gradients w.r.t.
    the scaled rows z; the weights already carry the incoming gradient)."""
    syn, real = _rowmajor(syn), _rowmajor(real)
    Ns, D = syn.shape[0], syn.shape[1]
    acc = acc_dtype(syn.dtype)
    BM, BN, BD = _blocks(D, syn.dtype)
    sl, rl = syn_labels.contiguous(), real_labels.contiguous()
    ss, rs = syn_scale.to(acc).contiguous(), real_scale.to(acc).contiguous()
    w, lc, ls = weights.to(acc).contiguous(), logc.to(acc).contiguous(), lse.to(acc).contiguous()
    outs = []
    for need, a, al, sa, b, bl, sb, syn_rows in ((need_syn, syn, sl, ss, real, rl, rs, True),
                                                 (need_real, real, rl, rs, syn, sl, ss, False)):
        if not need:
            outs.append(torch.empty((0, D), device=syn.device, dtype=acc))
            continue
        out = torch.zeros((a.shape[0], D), device=syn.device, dtype=acc)
        _bwd_kernel[(triton.cdiv(a.shape[0], BM),)](
            a, al, sa, b, bl, sb, w, lc, ls, out, a.shape[0], b.shape[0], D, Ns, a.stride(0), b.stride(0),
            1.0 / temperature, SYN_ROWS=syn_rows, FORM=form, ACC=tl_acc(syn.dtype), BLOCK_M=BM, BLOCK_N=BN,
            BLOCK_D=BD,
        )
        outs.append(out)
    return outs[0], outs[1]
