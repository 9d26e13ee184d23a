"""Triton kernels (and their launchers) for the low-rank reconstruction op; dispatch and autograd live in
``fastdd/ops/lowrank.py``, the C++/CUDA twins in ``csrc/lowrank/``.

Shapes: A [N, C, H, r], B [N, C, r, W], X / dX [N, C, H, W]; P = N * C planes, each an independent
(H x r) @ (r x W) product. fp32 / fp16 / bf16 go through ``tl.dot`` (fp32 accumulation; fp32 inputs
with ``input_precision="ieee"``, i.e. no TF32), fp64 through a broadcast multiply-and-sum in fp64.
The rank is processed in chunks of ``RB`` columns (``RB = max(16, next_pow2(r))`` up to 32 for the dot
path; padding a small rank to 16 costs flops, not bytes, and the op is memory bound).

``_fwd_kernel``  grid (P, cdiv(H, BH), cdiv(W, BW)): one X tile = sum over rank chunks of A tile @ B tile.
``_bwd_kernel``  grid (P, cdiv(W, BW), cdiv(r, RB)): one program owns a column strip of width BW of one
                 plane and one rank chunk; it walks down the rows of dX in tiles of BH rows, reading each
                 dX tile once, and from it
                   * dA[rows, chunk]  = dX tile @ B[chunk, strip]^T   (complete when the strip is all of W,
                     otherwise a partial written to an fp32 workspace [cdiv(W, BW), P, H, r] and summed),
                   * dB[chunk, strip] += A[rows, chunk]^T @ dX tile   (kept in registers for the whole
                     plane height, written once at the end).
                 With r <= RB and W <= BW_MAX (256) every dX element is read exactly once and no
                 workspace is used (all CIFAR/ImageNet-64 shapes; ImageNet 224 uses 1 strip of 256).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from fastdd.kernels._common import acc_dtype, tl_acc


@triton.jit
def _tile_product(x, y, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """x [M, K] @ y [K, L] accumulated in fp32 (dot) or in x's dtype (fp64 broadcast path)."""
    if USE_DOT:
        return tl.dot(x, y, input_precision=PREC)
    else:
        return tl.sum(x[:, :, None] * y[None, :, :], axis=1)


@triton.jit
def _fwd_kernel(a_ptr, b_ptr, x_ptr, H, W, R, ACC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                RB: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BH + tl.arange(0, BH)
    cols = tl.program_id(2) * BW + tl.arange(0, BW)
    rmask = rows < H
    cmask = cols < W
    a_base = a_ptr + p * H * R
    b_base = b_ptr + p * R * W
    acc = tl.zeros([BH, BW], dtype=ACC)
    for k0 in range(0, R, RB):
        ks = k0 + tl.arange(0, RB)
        kmask = ks < R
        a = tl.load(a_base + rows[:, None] * R + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_base + ks[:, None] * W + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += _tile_product(a, b, USE_DOT, PREC).to(ACC)
    x_tile = x_ptr + p * H * W + rows[:, None] * W + cols[None, :]
    tl.store(x_tile, acc.to(x_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _bwd_kernel(g_ptr, a_ptr, b_ptr, da_ptr, db_ptr, H, W, R, DA_SPLIT_STRIDE,
                NEED_A: tl.constexpr, NEED_B: tl.constexpr, ACC: tl.constexpr, BH: tl.constexpr,
                BW: tl.constexpr, RB: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    wb = tl.program_id(1)
    cols = wb * BW + tl.arange(0, BW)
    ks = tl.program_id(2) * RB + tl.arange(0, RB)
    cmask = cols < W
    kmask = ks < R
    a_base = a_ptr + p * H * R
    g_base = g_ptr + p * H * W
    # B[chunk, strip]^T as [BW, RB]: constant for the whole program
    b_t = tl.load(b_ptr + p * R * W + ks[None, :] * W + cols[:, None], mask=cmask[:, None] & kmask[None, :],
                  other=0.0)
    db_acc = tl.zeros([RB, BW], dtype=ACC)
    da_base = da_ptr + wb.to(tl.int64) * DA_SPLIT_STRIDE + p * H * R
    for h0 in range(0, H, BH):
        rows = h0 + tl.arange(0, BH)
        rmask = rows < H
        g = tl.load(g_base + rows[:, None] * W + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        if NEED_A:
            da = _tile_product(g, b_t, USE_DOT, PREC)
            tl.store(da_base + rows[:, None] * R + ks[None, :], da.to(da_ptr.dtype.element_ty),
                     mask=rmask[:, None] & kmask[None, :])
        if NEED_B:
            a = tl.load(a_base + rows[:, None] * R + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            db_acc += _tile_product(tl.trans(a), g, USE_DOT, PREC).to(ACC)
    if NEED_B:
        db_tile = db_ptr + p * R * W + ks[:, None] * W + cols[None, :]
        tl.store(db_tile, db_acc.to(db_ptr.dtype.element_ty), mask=kmask[:, None] & cmask[None, :])


def _config(dtype: torch.dtype, H: int, W: int, r: int, *, bw_max: int):
    """(BH, BW, RB, USE_DOT, PREC) for one call."""
    use_dot = dtype != torch.float64
    if use_dot:
        rb = min(32, max(16, triton.next_power_of_2(r)))
        bh = min(64, max(16, triton.next_power_of_2(H)))
        bw = min(bw_max, max(16, triton.next_power_of_2(W)))
    else:  # fp64: broadcast [BH, RB, BW] products, keep the tiles small
        rb = min(8, max(4, triton.next_power_of_2(r)))
        bh = min(16, max(4, triton.next_power_of_2(H)))
        bw = min(32, max(4, triton.next_power_of_2(W)))
    prec = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    return bh, bw, rb, use_dot, prec


def lowrank_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """X [N, C, H, W] = A [N, C, H, r] @ B [N, C, r, W] per plane, in A's dtype (fp32 accumulation)."""
    a, b = a.contiguous(), b.contiguous()
    N, C, H, r = a.shape
    W = b.shape[3]
    x = torch.empty((N, C, H, W), device=a.device, dtype=a.dtype)
    if x.numel() == 0:
        return x
    bh, bw, rb, use_dot, prec = _config(a.dtype, H, W, r, bw_max=128)
    grid = (N * C, triton.cdiv(H, bh), triton.cdiv(W, bw))
    _fwd_kernel[grid](a, b, x, H, W, r, ACC=tl_acc(a.dtype), BH=bh, BW=bw, RB=rb, USE_DOT=use_dot, PREC=prec)
    return x


def lowrank_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, need_a: bool,
                     need_b: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dA = dX B^T [N, C, H, r] or [0], dB = A^T dX [N, C, r, W] or [0]) from one pass over dX."""
    a, b = a.contiguous(), b.contiguous()
    g = grad.to(a.dtype).contiguous()
    N, C, H, r = a.shape
    W = b.shape[3]
    P = N * C
    da = torch.empty_like(a) if need_a else a.new_empty((0,))
    db = torch.empty_like(b) if need_b else b.new_empty((0,))
    if not (need_a or need_b) or P == 0:
        return da, db
    if H == 0 or W == 0:
        return (da.zero_() if need_a else da), (db.zero_() if need_b else db)
    bh, bw, rb, use_dot, prec = _config(a.dtype, H, W, r, bw_max=256)
    num_warps = 4
    if use_dot and bw >= 128:  # dX tile [BH, BW] + dB accumulator [RB, BW] + B^T [BW, RB] in registers
        bh, num_warps = 16, 8
    n_wb = triton.cdiv(W, bw)
    split = need_a and n_wb > 1
    da_out = torch.empty((n_wb, N, C, H, r), device=a.device, dtype=acc_dtype(a.dtype)) if split else da
    da_arg = da_out if need_a else a  # a dummy pointer when dA is not needed (never written)
    db_arg = db if need_b else b
    grid = (P, n_wb, triton.cdiv(r, rb))
    _bwd_kernel[grid](g, a, b, da_arg, db_arg, H, W, r, P * H * r if split else 0,
                      NEED_A=need_a, NEED_B=need_b, ACC=tl_acc(a.dtype), BH=bh, BW=bw, RB=rb, USE_DOT=use_dot,
                      PREC=prec, num_warps=num_warps)
    if split:
        da = da_out.sum(0).to(a.dtype)
    return da, db
