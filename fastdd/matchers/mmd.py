"""MMDMatcher: per-class MMD between real and synthetic embeddings (DM, DANCE, DDM).

A thin ``nn.Module`` over :mod:`fastdd.ops.class_mmd`; it holds no parameters and no Python loop over
classes, so ``torch.compile(fullgraph=True)`` traces it into one custom-op call.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from fastdd.ops import class_mmd as _ops
from fastdd.ops._common import check_backend_name

_KERNELS = ("linear", "gaussian")


class MMDMatcher(nn.Module):
    """``forward(real_feat [Nr, D], real_labels [Nr], syn_feat [Ns, D], syn_labels [Ns], num_classes)``
    returns a 0-d loss tensor, differentiable w.r.t. both feature tensors.

    kernel="linear" (DM): ``sum_c ||mean(real_c) - mean(syn_c)||^2`` (no normalisation by D or K).
    kernel="gaussian": ``sum_c [mean k(r, r') + mean k(s, s') - 2 mean k(r, s)]`` with
    ``k(x, y) = sum_b exp(-||x - y||^2 / (2 sigma_b^2))`` over ``bandwidths`` (biased, diagonal included).

    backend: None (automatic / ``FASTDD_BACKEND``) or one of "triton", "cuda", "cpp", "torch".
    validate: check label ranges and that every class has rows on both sides or neither, eagerly (a host
    sync); skipped automatically inside ``torch.compile``. Shape/dtype/device checks always run.
    """

    def __init__(self, kernel: str = "linear", bandwidths: Union[float, Sequence[float], None] = None,
                 backend: Optional[str] = None, validate: bool = True):
        super().__init__()
        if kernel not in _KERNELS:
            raise ValueError(f"kernel: expected one of {_KERNELS}, got {kernel!r}")
        if kernel == "gaussian":
            if bandwidths is None:
                raise ValueError("bandwidths: required for kernel='gaussian' (e.g. [1.0, 2.0, 4.0])")
            self.bandwidths = tuple(_ops._check_bandwidths(bandwidths))
        else:
            if bandwidths is not None:
                raise ValueError("bandwidths: only used with kernel='gaussian'")
            self.bandwidths = None
        check_backend_name(backend)
        self.kernel = kernel
        self.backend = backend
        self.validate = validate

    def forward(self, real_feat: torch.Tensor, real_labels: torch.Tensor, syn_feat: torch.Tensor,
                syn_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        if self.kernel == "linear":
            return _ops.class_mmd(real_feat, real_labels, syn_feat, syn_labels, num_classes,
                                  backend=self.backend, validate=self.validate)
        return _ops.gaussian_class_mmd(real_feat, real_labels, syn_feat, syn_labels, num_classes,
                                       list(self.bandwidths), backend=self.backend, validate=self.validate)

    def extra_repr(self) -> str:
        extra = f", bandwidths={list(self.bandwidths)}" if self.bandwidths else ""
        return f"kernel={self.kernel!r}{extra}, backend={self.backend!r}, validate={self.validate}"
