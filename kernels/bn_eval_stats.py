"""Triton kernels (and their launchers) for the eval-BatchNorm + statistics op; dispatch and autograd live in
``fastdd/ops/bn_eval_stats.py``, the C++ twin in ``csrc/bn_eval_stats/``.

x, y, gy, dx [N, C, H, W] in one of two dense layouts, addressed as x[n, c, p] = base[n * sN + c * sC + p * sP]
(P = H*W): NCHW (sN, sC, sP) = (C*P, P, 1), channels_last (P*C, 1, C). The launchers take tensors already in
that layout (y / dx allocated like x). Rows m = n * P + p, M = N * P.

``_forward_kernel``   grid (cdiv(M, BLOCK_M), cdiv(C, BLOCK_C)): one [BLOCK_M, BLOCK_C] tile: y = scale * x +
                      shift, and the tile's per-channel mean and centred sum of squares (two passes over
                      the tile in registers, fp32) into ``partial`` [cdiv(M, BLOCK_M), 2, C]; the launcher
                      combines the tiles in float64 (Chan et al.'s parallel variance), in a fixed order.
``_backward_kernel``  the same tiling: dx = (c0 + c1 * x) + scale * gy per channel, one read of x and gy.

Inputs fp16 / bf16 / fp32 (loaded as fp32; y and dx in the input dtype); fp64 goes through the op's
``closed_form`` backend.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

BLOCK_M = 64
BLOCK_C = 32


def _identity(kernel):
    return kernel


@triton.jit
def _tile(m0, c0, M, C, P, sN, sC, sP, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """(offsets [BLOCK_M, BLOCK_C], mask, channel indices, channel mask) of the tile at rows m0, channels c0."""
    rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    chans = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
    rmask = rows < M
    cmask = chans < C
    n = rows // P
    p = rows - n * P
    offs = (n * sN + p * sP)[:, None] + (chans * sC)[None, :]
    return offs, rmask[:, None] & cmask[None, :], chans, cmask


@triton.jit
def _forward_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, part_ptr, M, C, P, sN, sC, sP,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    bm = tl.program_id(0)
    offs, mask, chans, cmask = _tile(bm * BLOCK_M, tl.program_id(1) * BLOCK_C, M, C, P, sN, sC, sP,
                                     BLOCK_M, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(scale_ptr + chans, mask=cmask, other=0.0)
    b = tl.load(shift_ptr + chans, mask=cmask, other=0.0)
    tl.store(y_ptr + offs, (x * a[None, :] + b[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
    count = tl.minimum(M - bm * BLOCK_M, BLOCK_M).to(tl.float32)
    tile_mean = tl.sum(x, axis=0) / count  # masked entries loaded as 0
    d = tl.where(mask, x - tile_mean[None, :], 0.0)
    base = part_ptr + bm.to(tl.int64) * 2 * C
    tl.store(base + chans, tile_mean, mask=cmask)
    tl.store(base + C + chans, tl.sum(d * d, axis=0), mask=cmask)


@triton.jit
def _backward_kernel(gy_ptr, x_ptr, dx_ptr, scale_ptr, c0_ptr, c1_ptr, M, C, P, sN, sC, sP,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    offs, mask, chans, cmask = _tile(tl.program_id(0) * BLOCK_M, tl.program_id(1) * BLOCK_C, M, C, P, sN, sC, sP,
                                     BLOCK_M, BLOCK_C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + chans, mask=cmask, other=0.0)
    a0 = tl.load(c0_ptr + chans, mask=cmask, other=0.0)
    a1 = tl.load(c1_ptr + chans, mask=cmask, other=0.0)
    dx = (a0[None, :] + a1[None, :] * x) + s[None, :] * g
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _geometry(x: torch.Tensor, channels_last: bool):
    """(M, C, P, sN, sC, sP) of x dense in the given layout. The strides come from the layout, not from x: a
    size-1 dimension may carry any stride (x[..., :, 1] transposed from [..., 1, W] is still "contiguous")."""
    N, C, H, W = x.shape
    P = H * W
    return (N * P, C, P, P * C, 1, C) if channels_last else (N * P, C, P, C * P, P, 1)


def launch_forward(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, y: torch.Tensor, channels_last: bool,
                   wrap=_identity) -> Tuple[torch.Tensor, torch.Tensor]:
    """y = scale * x + shift (written into ``y``, laid out like x) and stats [C, 2] float32 (mean, biased
    var). x and y dense channels_last (``channels_last``) or NCHW; scale, shift [C] float32."""
    M, C, P, sN, sC, sP = _geometry(x, channels_last)
    nb = triton.cdiv(M, BLOCK_M)
    part = torch.empty((nb, 2, C), dtype=torch.float32, device=x.device)
    wrap(_forward_kernel)[(nb, triton.cdiv(C, BLOCK_C))](x, y, scale, shift, part, M, C, P, sN, sC, sP,
                                                          BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    # Chan et al.'s combination of the tiles' (count, mean, M2), in float64
    part = part.double()
    counts = torch.full((nb, 1), float(BLOCK_M), dtype=torch.float64, device=x.device)
    counts[-1] = M - (nb - 1) * BLOCK_M
    mean = (counts * part[:, 0]).sum(0) / M
    var = (part[:, 1].sum(0) + (counts * (part[:, 0] - mean).square()).sum(0)) / M
    return y, torch.stack([mean, var], 1).float()


def launch_backward(gy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor,
                    dx: torch.Tensor, channels_last: bool, wrap=_identity) -> torch.Tensor:
    """dx = (c0 + c1 * x) + scale * gy per channel, written into ``dx`` (x, gy, dx dense channels_last or NCHW;
    scale, c0, c1 [C] float32)."""
    M, C, P, sN, sC, sP = _geometry(x, channels_last)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(C, BLOCK_C))
    wrap(_backward_kernel)[grid](gy, x, dx, scale, c0, c1, M, C, P, sN, sC, sP, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    return dx
