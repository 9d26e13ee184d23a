"""SRe2L / DWA BatchNorm-statistics regulariser over every BN layer of a frozen teacher.

    L_BN = sum_l m_l * ( ||mu_l(x) - RM_l||_2 + r_var * ||var_l(x) - RV_l||_2 )

mu_l / var_l: per-channel mean and biased variance over (N, H, W) of the INPUT of BatchNorm layer l;
RM_l / RV_l: its running statistics; m_1 = ``first_multiplier`` for the first BN layer in
``model.modules()`` order, 1 for the others (spec ``lowrank_dwa_theory.md`` §2.1, §2.2 (b)).

A forward pre-hook on each BN layer only keeps a reference to the layer's input tensor (no copy, no
permute); :meth:`BNStatisticsLoss.loss` then feeds each captured map to the fused
:func:`fastdd.ops.feature_moments.bn_stat_loss` op (one pass for the statistics, one closed-form pass
for the gradient). The running statistics are read at loss time, so a perturbed teacher (DWA) whose
running statistics are untouched keeps the same targets.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from ..ops.feature_moments import bn_stat_loss


def batchnorm_layers(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` in ``modules()`` (registration) order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class BNStatisticsLoss:
    """Captures the BN inputs of ``model`` during its forward and computes L_BN (module docstring).

    Usage: ``logits = model(x); reg = bn.loss()``. ``first_multiplier`` (10 in SRe2L/DWA), ``var_weight``
    (DWA's r_var; 1 in SRe2L). Call :meth:`remove` to detach the hooks."""

    def __init__(self, model: nn.Module, first_multiplier: float = 10.0, var_weight: float = 1.0,
                 backend: Optional[str] = None):
        self.layers = batchnorm_layers(model)
        if not self.layers:
            raise ValueError(f"model: {type(model).__name__} has no BatchNorm layer")
        self.first_multiplier = float(first_multiplier)
        self.var_weight = float(var_weight)
        self.backend = backend
        self.inputs: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.enabled = True
        self._handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(_module, args):
            if self.enabled:
                self.inputs[i] = args[0]
        return hook

    def loss(self) -> torch.Tensor:
        """L_BN (0-d) of the last forward; the captured inputs are released afterwards."""
        missing = [i for i, x in enumerate(self.inputs) if x is None]
        if missing:
            raise RuntimeError(f"BNStatisticsLoss: BN layers {missing} saw no input; run the model forward first")
        total = None
        for i, (layer, x) in enumerate(zip(self.layers, self.inputs)):
            term = bn_stat_loss(x, layer.running_mean, layer.running_var, var_weight=self.var_weight,
                                backend=self.backend)
            if i == 0:
                term = term * self.first_multiplier
            total = term if total is None else total + term
        self.inputs = [None] * len(self.layers)
        return total

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
