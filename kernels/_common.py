"""Pieces shared by the Triton launchers: dtype rules (accumulate in float32, or float64 for float64 inputs)
and the dot-product tile of the InfoNCE and Gaussian-MMD kernels."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch accumulation dtype for ``dtype`` inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    """The Triton accumulation dtype (a ``tl.constexpr`` value) for ``dtype`` inputs."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def dot_tile(a_ptr, ia, amask, b_ptr, ib, bmask, D, stride_a, stride_b, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, B_NORMS: tl.constexpr):
    """(a_i . b_j for the tile [BLOCK_M, BLOCK_N] of rows ia / ib, accumulated in ACC; ||b_j||^2 [BLOCK_N]
    when B_NORMS, else zeros). fp32 inputs use IEEE fp32 dots (no TF32)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    bn = tl.zeros([BLOCK_N], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        dmask = (cols < D)[None, :]
        a = tl.load(a_ptr + ia[:, None] * stride_a + cols[None, :], mask=amask[:, None] & dmask, other=0.0)
        b = tl.load(b_ptr + ib[:, None] * stride_b + cols[None, :], mask=bmask[:, None] & dmask, other=0.0)
        if ACC == tl.float64:
            acc += tl.dot(a.to(ACC), tl.trans(b.to(ACC)), out_dtype=ACC)
        elif a.dtype == tl.float32:
            acc += tl.dot(a, tl.trans(b), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(b))
        if B_NORMS:
            bf = b.to(ACC)
            bn += tl.sum(bf * bf, axis=1)
    return acc, bn
