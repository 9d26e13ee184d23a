"""Batched crop / flip / roll augmentations of the SRe2L pipeline, every draw from an explicit generator.

- :class:`RecoverJitter`: SRe2L/DWA's per-iteration augmentation of the synthetic batch (spec
  ``lowrank_dwa_theory.md`` §2.1): optionally a random-resized crop (scale (0.08, 1), ratio (3/4, 4/3),
  resized back to the input size, bilinear) and a horizontal flip with probability 0.5, then
  ``torch.roll`` by (o1, o2) with o1, o2 uniform on {-J, ..., J} (``offsets="symmetric"``: SRe2L's
  recover_tiny.py, ``randint(-J, J)``) or on {0, ..., J} (``"nonnegative"``: the spec, SRe2L's ImageNet and
  CIFAR recover and every DWA script, ``randint(0, J)``). As in the reference, where the
  torchvision transform sees the whole batched tensor, ONE crop, ONE flip and ONE roll are drawn per
  call and applied to every image of the batch.
- :func:`random_crop_flip`: per-sample RandomCrop(size, padding) + horizontal flip (the squeeze and KD
  training augmentation), batched with one gather.
- :func:`random_resized_crop_flip`: per-sample RandomResizedCrop back to the input size (bilinear) +
  horizontal flip (the Tiny-ImageNet / ImageNet KD training augmentation), batched with one ``grid_sample``.
- :func:`beta_draws`: Beta(alpha, alpha) ratios from a generator (MixUp).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (both ends included)."""
    return int(torch.randint(low, high + 1, (), generator=generator, device=generator.device))


def rrc_box(height: int, width: int, generator: torch.Generator, scale=(0.08, 1.0),
            ratio=(3.0 / 4.0, 4.0 / 3.0)) -> Tuple[int, int, int, int]:
    """One RandomResizedCrop box ``(top, left, h, w)`` for an ``height x width`` image: up to 10 tries of
    an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``; otherwise the
    central crop with the ratio clamped to ``ratio`` (torchvision's rule)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, 0, height - h), _randint(generator, 0, width - w), h, w
    h, w = _fallback_crop_size(height, width, ratio)
    return (height - h) // 2, (width - w) // 2, h, w


def _fallback_crop_size(height: int, width: int, ratio) -> Tuple[int, int]:
    """(h, w) of the centre crop RandomResizedCrop falls back to: the whole image clipped to the ratio range."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return int(round(width / ratio[0])), width
    if in_ratio > ratio[1]:
        return height, int(round(height * ratio[1]))
    return height, width


#: ranges of the recover roll offsets: {-J..J} or {0..J}
ROLL_OFFSETS = ("symmetric", "nonnegative")


@dataclass(frozen=True)
class JitterDraw:
    """One draw of :class:`RecoverJitter`: crop box (or None), flip flag, roll offsets."""

    box: Tuple[int, int, int, int] | None
    flip: bool
    shifts: Tuple[int, int]


@dataclass(frozen=True)
class RecoverJitter:
    """SRe2L/DWA per-iteration jitter (module docstring). ``crop``: random-resized crop + flip;
    ``jitter``: the roll bound J; ``min_scale``: the crop's smallest area fraction; ``offsets``: the roll
    offsets' range, ``"symmetric"`` {-J..J} or ``"nonnegative"`` {0..J} (:data:`ROLL_OFFSETS`)."""

    crop: bool = False
    jitter: int = 4
    min_scale: float = 0.08
    offsets: str = "symmetric"

    def __post_init__(self) -> None:
        if self.offsets not in ROLL_OFFSETS:
            raise ValueError(f"offsets: expected one of {list(ROLL_OFFSETS)}, got {self.offsets!r}")

    def draw(self, size: Tuple[int, int], generator: torch.Generator) -> JitterDraw:
        """The random parameters of one call on images of ``size = (H, W)``: crop box, flip, then the two roll
        offsets (rows, columns), each uniform on the ``offsets`` range, in that order."""
        box, flip = None, False
        if self.crop:
            box = rrc_box(size[0], size[1], generator, (self.min_scale, 1.0))
            flip = _uniform(generator) < 0.5
        low = -self.jitter if self.offsets == "symmetric" else 0
        shifts = (_randint(generator, low, self.jitter), _randint(generator, low, self.jitter))
        return JitterDraw(box, flip, shifts)

    @staticmethod
    def apply(x: torch.Tensor, d: JitterDraw) -> torch.Tensor:
        """Apply draw ``d`` to the batch x [N, C, H, W] (differentiable); returns [N, C, H, W]."""
        h, w = x.shape[-2:]
        if d.box is not None:
            top, left, bh, bw = d.box
            x = F.interpolate(x[..., top:top + bh, left:left + bw], size=(h, w), mode="bilinear",
                              align_corners=False, antialias=bh > h or bw > w)
        if d.flip:
            x = x.flip(-1)
        if d.shifts != (0, 0):
            x = torch.roll(x, shifts=d.shifts, dims=(2, 3))
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.draw(tuple(x.shape[-2:]), generator))


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Per-sample RandomCrop(H x W, zero padding ``padding``) and, with ``flip``, a horizontal flip with
    probability 0.5: x [N, C, H, W] -> [N, C, H, W]. Draws: N row offsets, N column offsets, N flip coins."""
    n, c, h, w = x.shape
    dev = generator.device
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # [N, H]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # [N, W]
    if flip:
        coin = (torch.rand(n, generator=generator, device=dev) < 0.5).to(x.device)
        cols = torch.where(coin[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def random_resized_crop_flip(x: torch.Tensor, generator: torch.Generator, scale=(0.08, 1.0),
                             flip: bool = True) -> torch.Tensor:
    """Per-sample RandomResizedCrop (area fraction in ``scale``, aspect ratio in (3/4, 4/3), torchvision's rule,
    :func:`rrc_boxes`) resized back to H x W, then with ``flip`` a horizontal flip with probability 0.5:
    x [N, C, H, W] -> [N, C, H, W]. Draws: the boxes of :func:`rrc_boxes`, then N flip coins.

    The resize is ``F.interpolate(crop, (H, W), mode="bilinear", align_corners=False)`` of each crop (a crop is
    never larger than the output, so antialiasing never applies), done for all crops at once as two gathers and
    lerps (rows, then columns) with interpolate's source coordinates ``clamp(s (i + 0.5) - 0.5, 0)``, s = h / H."""
    n, c, h, w = x.shape
    dev = generator.device
    boxes = rrc_boxes(n, h, w, generator, tuple(scale)).to(x.device)  # [N, 4] (top, left, bh, bw)
    coin = (torch.rand(n, generator=generator, device=dev) < 0.5).to(x.device) if flip else None
    x = _lerp_axis(x, boxes[:, 0], boxes[:, 2], axis=2)  # [N, C, H, W]: rows of each crop, resized
    x = _lerp_axis(x, boxes[:, 1], boxes[:, 3], axis=3)
    if coin is not None:
        x = torch.where(coin[:, None, None, None], x.flip(-1), x)
    return x


def _lerp_axis(x: torch.Tensor, start: torch.Tensor, length: torch.Tensor, axis: int) -> torch.Tensor:
    """Bilinear resize along ``axis`` (2: rows, 3: columns) of the window [start_n, start_n + length_n) of every
    sample n back to the axis's full size (align_corners=False, as ``F.interpolate``). x [N, C, H, W]."""
    size = x.shape[axis]
    scale = length.to(torch.float32)[:, None] / size  # [N, 1]
    src = (scale * (torch.arange(size, device=x.device, dtype=torch.float32)[None, :] + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().long()  # [N, S], inside the window
    lam = (src - i0).to(x.dtype)
    i1 = torch.minimum(i0 + 1, length[:, None] - 1)
    i0, i1 = i0 + start[:, None], i1 + start[:, None]
    shape = [x.shape[0], 1, 1, 1]
    shape[axis] = size
    lam = lam.view(shape)
    if axis == 2:
        idx0, idx1 = i0[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]), \
            i1[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
    else:
        idx0, idx1 = i0[:, None, None, :].expand(-1, x.shape[1], x.shape[2], -1), \
            i1[:, None, None, :].expand(-1, x.shape[1], x.shape[2], -1)
    a, b = x.gather(axis, idx0), x.gather(axis, idx1)
    return a * (1 - lam) + b * lam


def beta_draws(alpha: float, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` draws of Beta(alpha, alpha), float64 [count] on the CPU: A / (A + B) with A, B ~ Gamma(alpha, 1),
    each by inverting its CDF at a uniform draw of ``generator`` (torch.distributions takes no generator)."""
    u = torch.rand(2 * count, generator=generator, device=generator.device, dtype=torch.float64).cpu()
    q = _gamma_quantile(alpha, u).view(2, count)
    return q[0] / (q[0] + q[1])


def _gamma_quantile(alpha: float, u: torch.Tensor) -> torch.Tensor:
    """Gamma(alpha, 1) quantiles of u [k] by bisection on the regularised incomplete gamma (float64)."""
    lo = torch.zeros_like(u)
    hi = torch.full_like(u, max(50.0, 20.0 * alpha))
    a = torch.full_like(u, alpha)
    for _ in range(80):
        mid = (lo + hi) / 2
        below = torch.special.gammainc(a, mid) < u
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return (lo + hi) / 2


def rrc_boxes(n: int, height: int, width: int, generator: torch.Generator, scale=(0.08, 1.0),
              ratio=(3.0 / 4.0, 4.0 / 3.0)) -> torch.Tensor:
    """``n`` independent RandomResizedCrop boxes, int64 [n, 4] = (top, left, h, w), drawn in bulk (the
    rule of :func:`rrc_box`: the first of 10 tries whose box fits, else the central crop with the ratio
    clamped). Draws: [n, 10] area fractions, [n, 10] log-ratios, then [n] top and [n] left uniforms."""
    dev = generator.device
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, 10, generator=generator, device=dev,
                                                                   dtype=torch.float64))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, 10, generator=generator, device=dev,
                                                               dtype=torch.float64))
    w = torch.sqrt(target * aspect).round().long().cpu()
    h = torch.sqrt(target / aspect).round().long().cpu()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1, dtype=torch.long))
    ch, cw = _fallback_crop_size(height, width, ratio)
    rows = torch.arange(n)
    ok = first >= 0
    bh = torch.where(ok, h[rows, first.clamp(min=0)], torch.full((n,), ch))
    bw = torch.where(ok, w[rows, first.clamp(min=0)], torch.full((n,), cw))
    u_top = torch.rand(n, generator=generator, device=dev, dtype=torch.float64).cpu()
    u_left = torch.rand(n, generator=generator, device=dev, dtype=torch.float64).cpu()
    top = torch.where(ok, (u_top * (height - bh + 1)).floor().long().clamp(max=height - bh), (height - bh) // 2)
    left = torch.where(ok, (u_left * (width - bw + 1)).floor().long().clamp(max=width - bw), (width - bw) // 2)
    return torch.stack([top, left, bh, bw], dim=1)
