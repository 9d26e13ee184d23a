"""Pieces of the soft-label knowledge-distillation (KD) evaluation protocol (spec ``lowrank_dwa_theory.md`` §2.1
"Evaluate / post-train", §2.4): a student trained from scratch on the distilled set with the teacher queried
online on every augmented, mixed batch.

- :func:`kd_loss`: KL(softmax(z_t / T) || softmax(z_s / T)), "batchmean" per model, summed over the M models
  trained at once, optionally times T^2 (only DWA's Tiny-ImageNet recipe uses T^2);
- :func:`mixup_groups`: MixUp inside each model's mini-batch (ratio ~ Beta(alpha, alpha), own permutation);
  with online soft labels the mixed input is all that changes (the teacher labels the mixed image);
- :func:`adamw_groups`: AdamW parameter groups, weight decay only on tensors with more than one dimension
  (SRe2L / DWA: no decay on biases and norm parameters);
- :func:`cosine_epoch_lr`: lr_e = 0.5 lr (1 + cos(pi e / E)) per epoch.
"""
from __future__ import annotations

import math
from typing import Iterable, List

import torch
import torch.nn.functional as F

from .crops import beta_draws


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            t_squared: bool = False) -> torch.Tensor:
    """Sum over models of KL(teacher || student) at temperature T, batch-mean per model (0-d).
    student_logits, teacher_logits [M, B, K]."""
    m, b, k = student_logits.shape
    log_s = F.log_softmax(student_logits.reshape(-1, k) / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.reshape(-1, k) / temperature, dim=1)
    loss = F.kl_div(log_s, log_t, reduction="sum", log_target=True) / b
    return loss * temperature ** 2 if t_squared else loss


def mixup_groups(x: torch.Tensor, generator: torch.Generator, alpha: float) -> torch.Tensor:
    """MixUp per model: x [M, B, C, H, W] -> lam_m x_m + (1 - lam_m) x_m[perm_m], lam_m ~ Beta(alpha, alpha).
    ``alpha <= 0`` returns x. Draws: M ratios, then M permutations (as random keys)."""
    if alpha <= 0:
        return x
    m, b = x.shape[:2]
    lam = beta_draws(alpha, m, generator).to(x.device, x.dtype).view(m, 1, *([1] * (x.dim() - 2)))
    perm = torch.rand(m, b, generator=generator, device=generator.device).argsort(dim=1).to(x.device)
    shuffled = x[torch.arange(m, device=x.device)[:, None], perm]
    return lam * x + (1 - lam) * shuffled


def adamw_groups(params: Iterable[torch.Tensor], weight_decay: float) -> List[dict]:
    """Two AdamW parameter groups: tensors with dim > 1 decayed by ``weight_decay``, the others not."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]


def cosine_epoch_lr(base: float, epoch: int, epochs: int) -> float:
    """Learning rate of epoch ``epoch`` (0-based) of ``epochs``: 0.5 base (1 + cos(pi epoch / epochs))."""
    return 0.5 * base * (1.0 + math.cos(math.pi * epoch / epochs))
