"""MomentMatcher: DDM style matching (moments L_MM and Gram L_CM) over several feature-map layers."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from fastdd.ops import feature_moments as _ops


class MomentMatcher(nn.Module):
    """loss = moment_weight * L_MM + gram_weight * L_CM between synthetic and real feature maps.

    L_MM is :func:`fastdd.ops.feature_moments.moment_loss` (DDM, spec ``ddm_mim4dd.md`` §1.4: per layer and
    class 0.5 * (MSE of channel means + MSE of channel stds), summed over classes, averaged over layers) and
    L_CM is :func:`~fastdd.ops.feature_moments.gram_loss` (§1.5: squared Frobenius distance of the class-mean
    Gram matrices). A weight of 0 skips that term entirely.

    Args:
        mode: ``"batchavg"`` (published estimator: moments of the class-mean map, unbiased spatial
            variance) or ``"persample"`` (class mean of per-sample moments, biased variance).
        relative: divide each squared error by the mean square of the real target.
        moment_weight, gram_weight: weights of L_MM and L_CM (the DDM scripts use 1e4 on one of them).
        layer_weights: optional per-layer multipliers (default 1 each; the sum is still divided by L).
        eps: added to the variance inside the square root.
        backend: force a backend (``triton``, ``cuda``, ``cpp``, ``torch``); ``None`` chooses per device.
        validate: check label values (range, every class on both sides; a host sync, skipped while
            ``torch.compile`` traces). Shapes, dtypes and devices are always checked.
    """

    def __init__(self, mode: str = "batchavg", relative: bool = False, moment_weight: float = 1.0,
                 gram_weight: float = 0.0, layer_weights: Optional[Sequence[float]] = None, eps: float = 1e-5,
                 backend: Optional[str] = None, validate: bool = True):
        super().__init__()
        if mode not in _ops.MODES:
            raise ValueError(f"mode: expected one of {_ops.MODES}, got {mode!r}")
        self.mode = mode
        self.relative = bool(relative)
        self.moment_weight = float(moment_weight)
        self.gram_weight = float(gram_weight)
        self.layer_weights = None if layer_weights is None else [float(w) for w in layer_weights]
        self.eps = float(eps)
        self.backend = backend
        self.validate = validate

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, relative={self.relative}, moment_weight={self.moment_weight}, "
                f"gram_weight={self.gram_weight}, backend={self.backend!r}")

    def forward(self, syn_maps, syn_labels: torch.Tensor, real_maps, real_labels: torch.Tensor,
                num_classes: int) -> torch.Tensor:
        """syn_maps / real_maps: a [N, C_l, H_l, W_l] tensor or a list of them (same C/H/W per layer on both
        sides, N_syn and N_real may differ); labels [N] in [0, num_classes), every class on both sides.
        Real statistics are computed without autograd. Returns a 0-d loss (float32; float64 for float64)."""
        syn = list(syn_maps) if isinstance(syn_maps, (list, tuple)) else [syn_maps]
        real = list(real_maps) if isinstance(real_maps, (list, tuple)) else [real_maps]
        syn = _ops.validate_maps("syn_maps", syn)
        real = _ops.validate_maps("real_maps", real, device=syn[0].device, dtype=syn[0].dtype)
        if len(real) != len(syn):
            raise ValueError(f"real_maps: expected {len(syn)} layers (as syn_maps), got {len(real)}")
        for l, (s, r) in enumerate(zip(syn, real)):
            if s.shape[1:] != r.shape[1:]:
                raise ValueError(f"real_maps[{l}]: per-sample shape {tuple(r.shape[1:])} differs from "
                                 f"syn_maps[{l}] {tuple(s.shape[1:])}")
        values = self.validate and not torch.compiler.is_compiling()  # label values need a host sync
        _ops.validate_class_labels("real_labels", real_labels, num_classes, real[0].shape[0], syn[0].device,
                                   values=values, require_all=False)
        _ops.validate_class_labels("syn_labels", syn_labels, num_classes, syn[0].shape[0], syn[0].device,
                                   values=values, other=real_labels, other_name="real_labels")
        loss = None
        if self.moment_weight != 0.0:
            with torch.no_grad():
                stats = [_ops.class_moments(r, real_labels, num_classes, mode=self.mode, eps=self.eps,
                                            backend=self.backend, validate=False) for r in real]
            loss = _ops.moment_loss(syn, syn_labels, stats, num_classes, mode=self.mode, relative=self.relative,
                                    eps=self.eps, weight=self.moment_weight, layer_weights=self.layer_weights,
                                    backend=self.backend, validate=False)
        if self.gram_weight != 0.0:
            with torch.no_grad():
                grams = [_ops.class_gram(r, real_labels, num_classes, backend=self.backend, validate=False)
                         for r in real]
            g = _ops.gram_loss(syn, syn_labels, grams, num_classes, weight=self.gram_weight,
                               layer_weights=self.layer_weights, backend=self.backend, validate=False)
            loss = g if loss is None else loss + g
        if loss is None:
            loss = syn[0].new_zeros((), dtype=torch.float64 if syn[0].dtype == torch.float64 else torch.float32)
        return loss
