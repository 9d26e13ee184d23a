"""Pieces of the soft-label knowledge-distillation (KD) evaluation protocol (spec ``lowrank_dwa_theory.md`` §2.1
"Evaluate / post-train", §2.4): a student trained from scratch on the distilled set with the teacher queried
online on every augmented, mixed batch.

- :func:`kd_loss`: KL(softmax(z_t / T) || softmax(z_s / T)), "batchmean" per model, summed over the M models
  trained at once, optionally times T^2 (only DWA's Tiny-ImageNet recipe uses T^2);
- :func:`mixup_groups` / :func:`cutmix_groups` / :func:`mix_groups`: MixUp or CutMix inside each model's
  mini-batch (ratio ~ Beta(alpha, alpha), own permutation); with online soft labels the mixed input is all
  that changes (the teacher labels the mixed image);
- :func:`adamw_groups`: AdamW parameter groups, weight decay only on tensors with more than one dimension
  (SRe2L / DWA: no decay on biases and norm parameters); :func:`kd_optimizer`: that AdamW, or SGD with
  momentum and decay on every tensor (DWA's Tiny-ImageNet recipe, the torchvision reference's default);
- :func:`cosine_epoch_lr`: lr_e = 0.5 lr (1 + cos(pi e / E)) per epoch; :func:`kd_epoch_lr` adds the
  torchvision reference's linear warm-up (LinearLR then CosineAnnealingLR over the remaining epochs).
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional

import torch
import torch.nn.functional as F

from .crops import beta_draws


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            t_squared: bool = False, divisor: Optional[float] = None) -> torch.Tensor:
    """Sum over models of KL(teacher || student) at temperature T, batch-mean per model (0-d).
    student_logits, teacher_logits [M, B, K]. ``divisor``: what the per-model sum over the B rows is divided
    by (default B; a DistributedDataParallel rank holding part of a global batch of B' rows passes
    B' / world, so that DDP's gradient average is the global batch mean)."""
    m, b, k = student_logits.shape
    log_s = F.log_softmax(student_logits.reshape(-1, k) / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.reshape(-1, k) / temperature, dim=1)
    loss = F.kl_div(log_s, log_t, reduction="sum", log_target=True) / (b if divisor is None else divisor)
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


def cutmix_groups(x: torch.Tensor, generator: torch.Generator, alpha: float) -> torch.Tensor:
    """CutMix per model: x [M, B, C, H, W] -> x with, in model m's batch, the box ``(y1:y2, x1:x2)`` of every
    image replaced by that of its partner x_m[perm_m]. lam_m ~ Beta(alpha, alpha); the box has sides
    ``int(H sqrt(1 - lam))`` x ``int(W sqrt(1 - lam))`` around a uniform centre pixel, clipped to the image
    (the rule of SRe2L / torchvision's RandomCutmix, as :func:`fastdd.relabel.draw_epoch`). ``alpha <= 0``
    returns x. Draws: M ratios, M centre rows, M centre columns, then M permutations (as random keys)."""
    if alpha <= 0:
        return x
    m, b = x.shape[:2]
    h, w = x.shape[-2:]
    gd = generator.device
    lam = beta_draws(alpha, m, generator)  # float64 [M] on the CPU
    cy = torch.randint(0, h, (m,), generator=generator, device=gd).cpu()
    cx = torch.randint(0, w, (m,), generator=generator, device=gd).cpu()
    perm = torch.rand(m, b, generator=generator, device=gd).argsort(dim=1).to(x.device)
    cut = torch.sqrt(1.0 - lam)
    ch, cw = (h * cut).long(), (w * cut).long()
    y1, y2 = (cy - ch // 2).clamp(0, h).to(x.device), (cy + ch // 2).clamp(0, h).to(x.device)
    x1, x2 = (cx - cw // 2).clamp(0, w).to(x.device), (cx + cw // 2).clamp(0, w).to(x.device)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    box = ((rows >= y1[:, None]) & (rows < y2[:, None]))[:, :, None] & \
        ((cols >= x1[:, None]) & (cols < x2[:, None]))[:, None, :]  # [M, H, W]
    shuffled = x[torch.arange(m, device=x.device)[:, None], perm]
    return torch.where(box.view(m, 1, 1, h, w), shuffled, x)


def mix_groups(x: torch.Tensor, generator: torch.Generator, mixup_alpha: float, cutmix_alpha: float) -> torch.Tensor:
    """The per-model batch mix of the KD protocol: x [M, B, C, H, W] -> [M, B, C, H, W]. Only ``mixup_alpha`` > 0:
    :func:`mixup_groups`; only ``cutmix_alpha`` > 0: :func:`cutmix_groups`; both: as torchvision's
    ``RandomChoice([RandomMixup, RandomCutmix])`` in DWA's Tiny-ImageNet collate, each model's batch gets one of
    the two with probability 1/2 (draws: M coins, then the MixUp draws, then the CutMix draws); neither: x."""
    if mixup_alpha > 0 and cutmix_alpha > 0:
        m = x.shape[0]
        coin = (torch.rand(m, generator=generator, device=generator.device) < 0.5).to(x.device)
        mixed, cut = mixup_groups(x, generator, mixup_alpha), cutmix_groups(x, generator, cutmix_alpha)
        return torch.where(coin.view(m, *([1] * (x.dim() - 1))), mixed, cut)
    if mixup_alpha > 0:
        return mixup_groups(x, generator, mixup_alpha)
    return cutmix_groups(x, generator, cutmix_alpha)


def adamw_groups(params: Iterable[torch.Tensor], weight_decay: float) -> List[dict]:
    """Two AdamW parameter groups: tensors with dim > 1 decayed by ``weight_decay``, the others not."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]


def kd_optimizer(params: Iterable[torch.Tensor], name: str, lr: float, weight_decay: float,
                 momentum: float = 0.9) -> torch.optim.Optimizer:
    """The students' optimiser: ``"adamw"`` (SRe2L / DWA CIFAR and ImageNet: AdamW, decay only on tensors with
    dim > 1, :func:`adamw_groups`) or ``"sgd"`` (DWA Tiny-ImageNet: SGD with ``momentum`` and ``weight_decay``
    on every tensor, the torchvision reference's default ``norm_weight_decay=None``)."""
    if name == "adamw":
        return torch.optim.AdamW(adamw_groups(params, weight_decay), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"kd_optimizer: expected 'adamw' or 'sgd', got {name!r}")


def cosine_epoch_lr(base: float, epoch: int, epochs: int) -> float:
    """Learning rate of epoch ``epoch`` (0-based) of ``epochs``: 0.5 base (1 + cos(pi epoch / epochs))."""
    return 0.5 * base * (1.0 + math.cos(math.pi * epoch / epochs))


def kd_epoch_lr(base: float, epoch: int, epochs: int, warmup_epochs: int = 0, warmup_factor: float = 0.01) -> float:
    """Learning rate of epoch ``epoch`` (0-based) of ``epochs`` with W = ``warmup_epochs`` of linear warm-up, as
    torchvision's ``SequentialLR([LinearLR(start_factor=f, total_iters=W), CosineAnnealingLR(T_max=E - W)],
    milestones=[W])`` stepped per epoch: base (f + (1 - f) e / W) for e < W, then
    0.5 base (1 + cos(pi (e - W) / (E - W))). W = 0 is :func:`cosine_epoch_lr`."""
    if epoch < warmup_epochs:
        return base * (warmup_factor + (1.0 - warmup_factor) * epoch / warmup_epochs)
    return cosine_epoch_lr(base, epoch - warmup_epochs, epochs - warmup_epochs)
