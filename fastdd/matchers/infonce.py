"""InfoNCEMatcher: contrastive (MIM4DD) loss between synthetic and real embeddings.

A thin ``nn.Module`` over :func:`fastdd.ops.infonce.infonce_loss`; no parameters (projection heads, if any,
belong to the method), no Python loop on the hot path, so ``torch.compile(fullgraph=True)`` traces it into
one custom-op call per direction.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastdd.ops import infonce as _ops


class InfoNCEMatcher(nn.Module):
    """``forward(syn_feat [Ns, D], syn_labels [Ns], real_feat [Nr, D], real_labels [Nr])`` -> 0-d loss,
    differentiable w.r.t. both feature tensors.

    Same-label (synthetic, real) pairs are positives, all other pairs negatives; similarities are
    cosine (``normalize=True``) or dot products, divided by ``temperature``.
    form="supcon": multi-positive InfoNCE ``mean_i -(1/P_i) sum_p [s_ip - logsumexp_j s_ij]``;
    form="nce": CRD binary NCE with ``h = exp(s) / (exp(s) + nce_constant)`` (default constant: negatives
    per anchor / number of rows on the other side); see :mod:`fastdd.ops.infonce` for the exact reading.
    symmetric=True also takes the real rows as anchors (the same op with the sides swapped) and returns
    the mean of the two directions (CRD/CMIM sum them: that is 2x this value).
    validate: label checks (>= 0, every anchor has a positive) eagerly; skipped inside torch.compile.
    """

    def __init__(self, temperature: float = 0.1, form: str = "supcon", normalize: bool = True,
                 symmetric: bool = False, backend: Optional[str] = None, validate: bool = True,
                 nce_constant: Optional[float] = None, nce_negatives: str = "sum"):
        super().__init__()
        _ops._check_options(temperature, form, nce_constant, nce_negatives, backend)
        self.temperature = float(temperature)
        self.form = form
        self.normalize = bool(normalize)
        self.symmetric = bool(symmetric)
        self.backend = backend
        self.validate = validate
        self.nce_constant = nce_constant
        self.nce_negatives = nce_negatives

    def _direction(self, a, la, b, lb) -> torch.Tensor:
        return _ops.infonce_loss(a, la, b, lb, temperature=self.temperature, form=self.form,
                                 normalize=self.normalize, nce_constant=self.nce_constant,
                                 nce_negatives=self.nce_negatives, backend=self.backend, validate=self.validate)

    def forward(self, syn_feat: torch.Tensor, syn_labels: torch.Tensor, real_feat: torch.Tensor,
                real_labels: torch.Tensor) -> torch.Tensor:
        loss = self._direction(syn_feat, syn_labels, real_feat, real_labels)
        if self.symmetric:
            loss = 0.5 * (loss + self._direction(real_feat, real_labels, syn_feat, syn_labels))
        return loss

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, form={self.form!r}, normalize={self.normalize}, "
                f"symmetric={self.symmetric}, backend={self.backend!r}, validate={self.validate}")
