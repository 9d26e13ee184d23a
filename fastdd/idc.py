"""IDC-style building blocks shared by DANCE, its expert pre-training and the IDC evaluation protocol.

* :class:`IDCAugment` -- the IDC ``DiffAug`` composition (spec ``dm_dance.md`` §2.5): ``flip`` and
  ``color`` are always applied (flip first), then ONE op chosen from the remaining geometric ops
  (``crop``/``scale``/``rotate``) per op group, then ``cutout`` last. Built from :class:`fastdd.augment.DSA`
  pieces, so the op maths and parameter ranges are DSA's; randomness comes from an explicit generator.
* :func:`cutmix` -- CutMix (probability ``p``, ratio ~ Beta(1, 1) = U[0, 1)) with the reference's box
  rule, vectorised over M independent groups (e.g. M models trained at once).
* :func:`decode` / :func:`mosaic` -- IDC multi-formation: every stored image is cut into ``f x f`` tiles,
  each tile bilinearly upsampled back to ``H x W``; :func:`mosaic` is the inverse-style initialisation
  (``f^2`` real images nearest-downsampled and laid out as one stored image).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .augment import DSA, AugDraw, parse_strategy
from .validation import check_positive_int

_ALWAYS = ("flip", "color")
_ONE_OF = ("crop", "scale", "rotate")


class IDCAugment:
    """IDC composition of DSA ops: ``flip`` -> ``color`` (always) -> one of crop/scale/rotate -> ``cutout``.

    ``strategy`` is a DSA strategy string; ops absent from it are skipped. Each stage is a
    :class:`~fastdd.augment.DSA` ('M' mode for the always-on stages, 'S' mode for the one-of stage).
    """

    def __init__(self, strategy: str):
        ops = parse_strategy(strategy)
        self.strategy = strategy
        always = [o for o in _ALWAYS if o in ops]
        one_of = [o for o in _ONE_OF if o in ops]
        self.stages: List[DSA] = []
        if always:
            self.stages.append(DSA("_".join(always), mode="M"))
        if one_of:
            self.stages.append(DSA("_".join(one_of), mode="S"))
        if "cutout" in ops:
            self.stages.append(DSA("cutout", mode="M"))

    def __repr__(self) -> str:
        return f"IDCAugment({self.strategy!r})"

    def draw(self, num_groups: int, generator: torch.Generator, image_size: Tuple[int, int],
             op_groups: Optional[torch.Tensor] = None, device=None) -> List[AugDraw]:
        """One parameter set per group and stage (``op_groups`` shares the one-of choice, as in DSA)."""
        return [s.draw(num_groups, generator, image_size, op_groups=op_groups if s.mode == "S" else None,
                       device=device) for s in self.stages]

    def apply(self, x: torch.Tensor, draws: Sequence[AugDraw], group: torch.Tensor) -> torch.Tensor:
        """Augment x [N, C, H, W]; sample i gets the parameters of group ``group[i]`` at every stage."""
        for stage, d in zip(self.stages, draws):
            x = stage.apply(x, d, group)
        return x

    def per_sample(self, x: torch.Tensor, generator: torch.Generator,
                   op_groups: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Independent parameters per sample; the one-of op is shared within each ``op_groups`` value
        (default: one choice for the whole batch, as the reference's per-batch call)."""
        n = x.shape[0]
        if op_groups is None:
            op_groups = torch.zeros(n, dtype=torch.int64, device=generator.device)
        draws = self.draw(n, generator, tuple(x.shape[-2:]), op_groups=op_groups, device=x.device)
        return self.apply(x, draws, torch.arange(n, device=x.device))

    def shared(self, xs: Sequence[torch.Tensor], generator: torch.Generator) -> List[torch.Tensor]:
        """ONE parameter set for every sample of every tensor in ``xs`` (the reference's batch=True call on
        the concatenation [real; synthetic], which makes the augmentation Siamese by construction)."""
        draws = self.draw(1, generator, tuple(xs[0].shape[-2:]), device=xs[0].device)
        return [self.apply(x, draws, torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)) for x in xs]


def cutmix(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, p: float = 0.5):
    """CutMix per group. x [M, B, C, H, W], y [M, B] -> (x_mixed, y_a [M, B], y_b [M, B], lam [M]).

    For each group m, with probability ``p``: ratio r ~ U[0, 1) (= Beta(1, 1)), a box of side
    ``int(W sqrt(1-r))`` x ``int(H sqrt(1-r))`` centred on a uniform pixel (clipped to the image) is pasted
    from a random permutation of the group's batch; ``lam = 1 - box area / (H W)``. Groups without CutMix
    get lam = 1 and y_b = y_a. The training loss is ``lam * CE(., y_a) + (1 - lam) * CE(., y_b)`` per group.
    Random numbers come only from ``generator`` (drawn on its device).
    """
    m, b = y.shape
    h, w = x.shape[-2:]
    gd = generator.device
    use = torch.rand(m, generator=generator, device=gd) < p
    ratio = torch.rand(m, generator=generator, device=gd)
    cx = torch.randint(0, w, (m,), generator=generator, device=gd)
    cy = torch.randint(0, h, (m,), generator=generator, device=gd)
    perm = torch.rand(m, b, generator=generator, device=gd).argsort(dim=1)
    use, ratio, cx, cy, perm = (t.to(x.device) for t in (use, ratio, cx, cy, perm))
    cut = torch.sqrt(1.0 - ratio.double())
    cut_w, cut_h = (w * cut).long(), (h * cut).long()
    x1, x2 = (cx - cut_w // 2).clamp(0, w), (cx + cut_w // 2).clamp(0, w)
    y1, y2 = (cy - cut_h // 2).clamp(0, h), (cy + cut_h // 2).clamp(0, h)
    cols = torch.arange(w, device=x.device)
    rows = torch.arange(h, device=x.device)
    in_x = (cols >= x1[:, None]) & (cols < x2[:, None])  # [M, W]
    in_y = (rows >= y1[:, None]) & (rows < y2[:, None])  # [M, H]
    box = (in_y[:, :, None] & in_x[:, None, :]) & use[:, None, None]  # [M, H, W]
    rows_m = torch.arange(m, device=x.device)[:, None]
    shuffled = x[rows_m, perm]
    mixed = torch.where(box[:, None, None], shuffled, x)
    area = ((x2 - x1) * (y2 - y1)).double()
    lam = torch.where(use, 1.0 - area / (h * w), torch.ones_like(area)).to(x.dtype)
    y_b = torch.where(use[:, None], y[rows_m, perm], y)
    return mixed, y, y_b, lam


def cutmix_loss(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Sum over groups of ``lam_m CE_mean(logits_m, y_a) + (1 - lam_m) CE_mean(logits_m, y_b)``.
    logits [M, B, K], labels [M, B], lam [M]."""
    m, b, k = logits.shape
    ce_a = F.cross_entropy(logits.reshape(-1, k), y_a.reshape(-1), reduction="none").view(m, b).mean(1)
    ce_b = F.cross_entropy(logits.reshape(-1, k), y_b.reshape(-1), reduction="none").view(m, b).mean(1)
    return (lam * ce_a + (1 - lam) * ce_b).sum()


def decode(stored: torch.Tensor, factor: int, pad_value: float | torch.Tensor = 0.5) -> torch.Tensor:
    """Multi-formation decode: stored [N, C, H, W] -> [N * f^2, C, H, W].

    Output row ``n * f^2 + i * f + j`` is tile (i, j) (row-major) of stored image n, bilinearly upsampled
    (``align_corners=False``) to H x W. H, W not divisible by f are first padded at the bottom/right with
    ``pad_value`` (scalar or per-channel [C]). ``factor == 1`` returns ``stored`` itself. Differentiable.
    """
    check_positive_int("factor", factor)
    if factor == 1:
        return stored
    n, c, h, w = stored.shape
    ph, pw = (-h) % factor, (-w) % factor
    x = stored
    if ph or pw:
        fill = torch.as_tensor(pad_value, dtype=stored.dtype, device=stored.device).reshape(-1, 1, 1)
        canvas = fill.expand(c, h + ph, w + pw).unsqueeze(0).repeat(n, 1, 1, 1)
        x = torch.cat([torch.cat([x, canvas[:, :, :h, w:]], dim=3), canvas[:, :, h:, :]], dim=2)
    th, tw = x.shape[2] // factor, x.shape[3] // factor
    tiles = x.reshape(n, c, factor, th, factor, tw).permute(0, 2, 4, 1, 3, 5)  # [N, f, f, C, th, tw]
    tiles = tiles.reshape(n * factor * factor, c, th, tw)
    return F.interpolate(tiles, size=(h, w), mode="bilinear", align_corners=False)


def mosaic(images: torch.Tensor, factor: int) -> torch.Tensor:
    """IDC ``mix`` initialisation: images [N * f^2, C, H, W] -> stored [N, C, H, W].

    Image ``n * f^2 + i * f + j`` is nearest-downsampled to the tile size and becomes tile (i, j) of
    stored image n (the layout :func:`decode` reads back). H, W must be divisible by f (the 28x28 and
    32x32 datasets are, for f = 2 and 4).
    """
    check_positive_int("factor", factor)
    if factor == 1:
        return images
    nf, c, h, w = images.shape
    if h % factor or w % factor:
        raise ValueError(f"factor: image size {h}x{w} is not divisible by factor {factor} (mix init)")
    if nf % (factor * factor):
        raise ValueError(f"images: {nf} images is not a multiple of factor^2 = {factor * factor}")
    th, tw = h // factor, w // factor
    small = F.interpolate(images, size=(th, tw), mode="nearest")
    n = nf // (factor * factor)
    return small.reshape(n, factor, factor, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def multistep_lr(base: float, epoch: int, epochs: int, gamma: float = 0.2) -> float:
    """IDC/DANCE MultiStepLR: lr of ``epoch`` (0-based) with milestones ``2E//3`` and ``5E//6``."""
    drops = sum(epoch >= mlt for mlt in (2 * epochs // 3, 5 * epochs // 6))
    return base * gamma ** drops
