"""DWA, Diversity-Driven Synthesis (Du et al., NeurIPS 2024): SRe2L recover with real-image initialisation,
a decoupled variance weight ``r_var`` and a directed weight perturbation of the teacher per synthesis batch.

Spec ``lowrank_dwa_theory.md`` §2.2-2.3. At the start of every unit (IPC index j, class batch b; see
:mod:`fastdd.methods.recover`) the teacher's weights are moved by :func:`directed_perturbation`: one jittered
view v of the unit's initial (real) images, then K steps

    g_k = grad_theta CE(f_theta(v), y);   theta <- theta + (rho / K) g_k / (||g_k||_2 + 1e-12)

(gradient ASCENT, the norm global over every parameter tensor: convs, BN affine, fc), the teacher in eval
mode, so its BN running statistics, the targets of the BN term, never change; ||theta_K - theta_0|| <= rho.
The unit is then synthesised with the perturbed teacher.

``dwa_mode`` switches what the next perturbation starts from:

- ``accumulate`` (default; the released code): the teacher is reloaded at the start of every IPC index and
  the perturbations of its class batches add up (ImageNet with 10 batches per index drifts up to 10 rho);
  with one class batch per index (CIFAR-100, Tiny, any dataset with at most ``batch_classes`` classes) it
  equals ``reset``;
- ``reset``: every unit starts from the trained teacher.

The perturbation's jittered view is the first draw of the unit's synthesis generator
(:func:`fastdd.methods.recover.unit_seeds`). Under ``torchrun`` every process runs whole IPC indices (all
their class batches, in order), so ``accumulate`` chains exactly the same perturbations as one process does.

Presets (the spec's table): ``cifar`` (1000 iterations, batch 100, lr 0.25, r_bn 0.01, r_var 11, roll J=4
only, rho 0.015, K 12), ``tiny`` (2000, batch 200, lr 0.1, r_var 11, RRC + flip + roll J=4, K 12),
``imagenet`` (2000, batch 100, lr 0.25, r_var 2, RRC + flip + roll J=32, K 15). First-BN multiplier 10.
Roll offsets in {-J..J} by default; every DWA script draws {0..J} (``--roll-offsets nonnegative``; see
:mod:`fastdd.methods.recover` for why the default differs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .recover import RecoverConfig, RecoverMethod
from .registry import register

DWA_MODES = ("accumulate", "reset")

DWA_PRESETS = {
    "cifar": dict(iterations=1000, lr_img=0.25, batch_classes=100, r_bn=0.01, r_var=11.0, first_bn_multiplier=10.0,
                  crop=False, jitter=4, rho=0.015, perturb_steps=12),
    "tiny": dict(iterations=2000, lr_img=0.1, batch_classes=200, r_bn=0.01, r_var=11.0, first_bn_multiplier=10.0,
                 crop=True, jitter=4, rho=0.015, perturb_steps=12),
    "imagenet": dict(iterations=2000, lr_img=0.25, batch_classes=100, r_bn=0.01, r_var=2.0,
                     first_bn_multiplier=10.0, crop=True, jitter=32, rho=0.015, perturb_steps=15),
}


@dataclass
class DWAConfig(RecoverConfig):
    """DWA options (``None`` fields: the dataset preset, see the module docstring)."""

    init: str = "real"  # DWA starts from random real images of each class
    rho: Optional[float] = None  # radius of the directed weight perturbation
    perturb_steps: Optional[int] = None  # K, normalised ascent steps of size rho / K
    dwa_mode: str = "accumulate"  # "accumulate" within an IPC index (released code) or "reset" per batch

    presets: ClassVar[Dict[str, dict]] = DWA_PRESETS

    def validate(self) -> None:
        super().validate()
        if self.dwa_mode not in DWA_MODES:
            raise ValueError(f"dwa_mode: expected one of {list(DWA_MODES)}, got {self.dwa_mode!r}")
        if self.rho is not None and not self.rho >= 0:
            raise ValueError(f"rho: must be >= 0, got {self.rho}")
        if self.perturb_steps is not None and (not isinstance(self.perturb_steps, int) or self.perturb_steps < 0):
            raise ValueError(f"perturb_steps: must be an int >= 0, got {self.perturb_steps!r}")


def directed_perturbation(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, rho: float, steps: int) -> None:
    """Move ``model``'s parameters in place by ``steps`` normalised gradient-ascent steps of size rho/steps
    on CE(model(x), labels) (module docstring). x [B, C, H, W], labels [B]. The model's mode is left as it
    is (eval: BN running statistics are not touched); parameters keep their ``requires_grad`` flags."""
    params: List[torch.Tensor] = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        for _ in range(steps):
            with torch.enable_grad():
                loss = F.cross_entropy(model(x), labels)
                grads = torch.autograd.grad(loss, params)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            with torch.no_grad():
                torch._foreach_add_(params, torch._foreach_mul(grads, (rho / steps) / (norm + 1e-12)))
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


@register("dwa")
class DWA(RecoverMethod):
    """DWA (module docstring)."""

    config_cls = DWAConfig

    def __init__(self, config: DWAConfig, dataset, device="cpu", shard: Optional[Tuple[int, int]] = None):
        super().__init__(config, dataset, device, shard=shard)
        self.trained = [p.detach().clone() for p in self.teacher.parameters()]

    def _restore_teacher(self) -> None:
        with torch.no_grad():
            for p, q in zip(self.teacher.parameters(), self.trained):
                p.copy_(q)

    def start_unit(self, unit: int) -> None:
        super().start_unit(unit)
        _, b, _, _ = self.unit_rows(unit)
        if self.config.dwa_mode == "reset" or b == 0:
            self._restore_teacher()
        if self.config.perturb_steps and self.config.rho:
            view = self.jitter(self.work.detach(), self.unit_gen)  # the unit's synthesis generator
            self.bn_loss.enabled = False
            try:
                directed_perturbation(self.teacher, view, self.unit_labels, self.config.rho, self.config.perturb_steps)
            finally:
                self.bn_loss.enabled = True

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["teacher"] = [p.detach().cpu().clone() for p in self.teacher.parameters()]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for p, q in zip(self.teacher.parameters(), state["teacher"]):
                p.copy_(q.to(p.device))
