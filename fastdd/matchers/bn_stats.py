"""SRe2L / DWA BatchNorm-statistics regulariser over every BN layer of a frozen teacher.

    L_BN = sum_l m_l * ( ||mu_l(x) - RM_l||_2 + r_var * ||var_l(x) - RV_l||_2 )

mu_l / var_l: per-channel mean and biased variance over (N, H, W) of the INPUT of BatchNorm layer l;
RM_l / RV_l: its running statistics; m_1 = ``first_multiplier`` for the first BN layer in
``model.modules()`` order, 1 for the others (spec ``lowrank_dwa_theory.md`` §2.1, §2.2 (b)).

Two ways to obtain mu_l / var_l (``fused``):

* ``fused=True`` (default): every ``nn.BatchNorm2d`` of the model runs, while the loss is enabled and the
  layer is in eval mode, :func:`fastdd.ops.bn_eval_stats.bn_eval_stats`: the BatchNorm output and the
  statistics of its input in one pass, and in the backward the BatchNorm gradient and the statistics'
  gradient in one pass (no separate statistics pass, no gradient add). The layer's class is switched to
  the subclass :class:`FusedStatsBatchNorm2d` (same parameters, buffers, state-dict keys and hooks);
  :meth:`BNStatisticsLoss.remove` switches it back. Disabled (``enabled = False``, e.g. DWA's weight
  perturbation, which needs the gradients of the BatchNorm weights) or in train mode, the layer is the
  plain BatchNorm. Other BatchNorm kinds (1d / 3d) are captured as below.
* ``fused=False``: a forward pre-hook on each BN layer only keeps a reference to the layer's input tensor
  (no copy, no permute); :meth:`BNStatisticsLoss.loss` then feeds each captured map to the fused
  :func:`fastdd.ops.feature_moments.bn_stat_loss` op (one pass for the statistics, one closed-form pass
  for the gradient).

The running statistics are read at loss time, so a perturbed teacher (DWA) whose running statistics are
untouched keeps the same targets.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from ..ops.bn_eval_stats import bn_eval_stats, eval_affine
from ..ops.feature_moments import bn_stat_distance, bn_stat_loss


def batchnorm_layers(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` in ``modules()`` (registration) order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class FusedStatsBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose eval forward, while its :class:`BNStatisticsLoss` is enabled, also hands the
    batch statistics of its input to the loss (fused op, module docstring). Made only by switching the
    class of an existing layer (:meth:`BNStatisticsLoss.__init__`)."""

    _fastdd_owner: BNStatisticsLoss
    _fastdd_index: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = getattr(self, "_fastdd_owner", None)  # None in a copy of the model (__getstate__)
        if owner is None or not owner.enabled:
            return super().forward(x)
        if self.training or x.dim() != 4 or self.running_var is None:  # captured as the pre-hook does
            owner.inputs[self._fastdd_index] = x
            return super().forward(x)
        scale, shift = eval_affine(self)
        y, mean, var = bn_eval_stats(x, scale, shift, backend=owner.fused_backend)
        owner.stats[self._fastdd_index] = (mean, var)
        return y

    def __getstate__(self):
        """Copies and pickles of the model leave the loss behind: the copy's layer is a plain BatchNorm."""
        state = dict(super().__getstate__())
        state.pop("_fastdd_owner", None)
        state.pop("_fastdd_index", None)
        return state


class BNStatisticsLoss:
    """Captures the BN inputs of ``model`` during its forward and computes L_BN (module docstring).

    Usage: ``logits = model(x); reg = bn.loss()``. ``first_multiplier`` (10 in SRe2L/DWA), ``var_weight``
    (DWA's r_var; 1 in SRe2L), ``fused`` (module docstring; ``backend`` names the op backend of either
    way). Call :meth:`remove` to restore the model."""

    def __init__(self, model: nn.Module, first_multiplier: float = 10.0, var_weight: float = 1.0,
                 backend: Optional[str] = None, fused: bool = True):
        self.layers = batchnorm_layers(model)
        if not self.layers:
            raise ValueError(f"model: {type(model).__name__} has no BatchNorm layer")
        self.first_multiplier = float(first_multiplier)
        self.var_weight = float(var_weight)
        self.backend = backend
        self.fused_backend = backend if backend in (None, "auto", "triton", "cpp", "closed_form", "torch") else None
        self.inputs: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.stats: List[Optional[tuple]] = [None] * len(self.layers)
        self.enabled = True
        self._handles = []
        self._switched = []
        for i, layer in enumerate(self.layers):
            if fused and type(layer) is nn.BatchNorm2d:
                layer.__class__ = FusedStatsBatchNorm2d
                layer._fastdd_owner, layer._fastdd_index = self, i
                self._switched.append(layer)
            else:
                self._handles.append(layer.register_forward_pre_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(_module, args):
            if self.enabled:
                self.inputs[i] = args[0]
        return hook

    def loss(self) -> torch.Tensor:
        """L_BN (0-d) of the last forward; the captured inputs are released afterwards."""
        missing = [i for i, (x, st) in enumerate(zip(self.inputs, self.stats)) if x is None and st is None]
        if missing:
            raise RuntimeError(f"BNStatisticsLoss: BN layers {missing} saw no input; run the model forward first")
        total = None
        for i, (layer, x, st) in enumerate(zip(self.layers, self.inputs, self.stats)):
            if st is None:
                term = bn_stat_loss(x, layer.running_mean, layer.running_var, var_weight=self.var_weight,
                                    backend=self.backend)
            else:
                term = bn_stat_distance(*st, layer.running_mean, layer.running_var, self.var_weight)
            if i == 0:
                term = term * self.first_multiplier
            total = term if total is None else total + term
        self.inputs = [None] * len(self.layers)
        self.stats = [None] * len(self.layers)
        return total

    def remove(self) -> None:
        """Detach the hooks and give the switched layers back their class: the model is as before."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self._switched:
            layer.__class__ = nn.BatchNorm2d
            del layer._fastdd_owner, layer._fastdd_index
        self._switched = []
