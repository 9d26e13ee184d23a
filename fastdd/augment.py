"""DSA: Differentiable Siamese Augmentation, batched and on-device.

The six reference ops of DSA (Zhao & Bilen, "Dataset Condensation with Differentiable Siamese
Augmentation"), as used by DM: ``color`` (brightness, saturation, contrast), ``crop`` (integer
translation with zero fill), ``cutout``, ``flip`` (width axis), ``scale`` and ``rotate`` (affine grid +
bilinear ``grid_sample``, zero padding, ``align_corners=False``). Ranges follow the reference
``ParamDiffAug`` (see :class:`DSAParams`).

Parameters are drawn once per *group* (:class:`AugDraw` holds ``G`` parameter sets) and sample ``i`` of a
batch receives the transform of group ``group[i]``. This one mechanism covers

* DM training (:meth:`DSA.siamese`): one group per class, the identical transform applied to the real and
  the synthetic samples of that class (the reference's "Siamese" seeding, made explicit);
* evaluation (:meth:`DSA.per_sample`): one group per sample, i.e. independent parameters per sample.

In mode ``'S'`` each group applies ONE op, chosen uniformly from the strategy; the choice is drawn once
per *op group* (``op_groups`` maps groups to op groups), so several groups can share an op choice while
keeping their own parameters; each op is computed only on the samples whose group chose it. In mode
``'M'`` every op of the strategy is applied, in strategy order.

Everything is batched over samples and groups (no Python loop over either; only over the <= 6 ops), runs
on the images' device and is differentiable w.r.t. the images. Random numbers come only from an explicit
``torch.Generator`` (drawn on ``generator.device``); the global RNG is never used or reseeded.

Conventions: images are ``[N, C, H, W]``; "x" is the width axis (last dim, columns) and "y" the height
axis (dim -2, rows), as in ``F.affine_grid`` / ``F.grid_sample``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fastdd.validation import check_positive_int, check_tensor

__all__ = [
    "OPS",
    "FULL_STRATEGY",
    "NO_FLIP_STRATEGY",
    "DSAParams",
    "AugDraw",
    "DSA",
    "dsa_strategy_for",
    "parse_strategy",
    "crop_size",
    "cutout_size",
]

#: Names of the supported ops, in the reference strategy order.
OPS: Tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
FULL_STRATEGY = "color_crop_cutout_flip_scale_rotate"
NO_FLIP_STRATEGY = "color_crop_cutout_scale_rotate"
_DIGIT_DATASETS = frozenset({"mnist", "svhn", "digits"})
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32)
# Cutout centre used by AugDraw.identity: far outside any image, so the cut square never intersects it.
_CUTOUT_OUTSIDE = -(1 << 40)


def dsa_strategy_for(dataset_name: str) -> str:
    """DSA strategy recommended for a dataset (reference README, spec 1.7).

    Digit datasets (``mnist``, ``svhn``, ``digits``) get ``color_crop_cutout_scale_rotate`` (no flip, a
    mirrored digit is a different glyph); every other dataset (FashionMNIST, CIFAR-10/100, TinyImageNet,
    ...) gets the full ``color_crop_cutout_flip_scale_rotate``. Matching ignores case, ``-`` and ``_``.
    """
    if not isinstance(dataset_name, str):
        raise TypeError(f"dataset_name: expected a str, got {type(dataset_name).__name__}")
    key = dataset_name.lower().replace("-", "").replace("_", "")
    return NO_FLIP_STRATEGY if key in _DIGIT_DATASETS else FULL_STRATEGY


def parse_strategy(strategy: str) -> Tuple[str, ...]:
    """Split a strategy string on ``_`` into op names; ``""`` / ``"none"`` give no ops (identity)."""
    if not isinstance(strategy, str):
        raise TypeError(f"strategy: expected a str, got {type(strategy).__name__}")
    tokens = [t for t in strategy.lower().split("_") if t and t != "none"]
    unknown = [t for t in tokens if t not in OPS]
    if unknown:
        raise ValueError(f"strategy: unknown op(s) {unknown} in {strategy!r}; known ops are {OPS}")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"strategy: repeated op in {strategy!r}")
    return tuple(tokens)


def crop_size(image_size: Tuple[int, int], ratio: float = 0.125) -> Tuple[int, int]:
    """Maximum crop translation ``(shift_y, shift_x)`` = ``int(H*ratio + 0.5), int(W*ratio + 0.5)``."""
    h, w = image_size
    return int(h * ratio + 0.5), int(w * ratio + 0.5)


def cutout_size(image_size: Tuple[int, int], ratio: float = 0.5) -> Tuple[int, int]:
    """Cutout rectangle ``(side_y, side_x)`` = ``int(H*ratio + 0.5), int(W*ratio + 0.5)`` (a square for H == W)."""
    h, w = image_size
    return int(h * ratio + 0.5), int(w * ratio + 0.5)


@dataclass(frozen=True)
class DSAParams:
    """Reference DSA parameter ranges (``ParamDiffAug``).

    prob_flip: flip probability. ratio_scale: scale factors ~ U[1/ratio, ratio). ratio_rotate: angle
    ~ U[-ratio, ratio) degrees. ratio_crop_pad: max translation = int(size*ratio + 0.5) pixels.
    ratio_cutout: cutout side = int(size*ratio + 0.5). brightness: additive shift (r - 0.5)*brightness.
    saturation: factor r*saturation. contrast: factor r + contrast (r ~ U[0, 1) throughout).
    """

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{f.name}: expected a finite number, got {v!r}")
            if v < 0:
                raise ValueError(f"{f.name}: must be >= 0, got {v}")
        if self.prob_flip > 1:
            raise ValueError(f"prob_flip: must lie in [0, 1], got {self.prob_flip}")
        if self.ratio_scale < 1:
            raise ValueError(f"ratio_scale: must be >= 1, got {self.ratio_scale}")
        if self.ratio_cutout > 1:
            raise ValueError(f"ratio_cutout: must lie in [0, 1], got {self.ratio_cutout}")


_FLOAT_FIELDS = ("brightness", "saturation", "contrast", "scale_x", "scale_y", "angle")
_LONG_FIELDS = ("op", "shift_x", "shift_y", "cutout_x", "cutout_y")


@dataclass
class AugDraw:
    """One DSA parameter set per group (``G`` groups), plus the op choice; every field is a ``[G]`` tensor.

    Values are the *final* parameters, not the raw uniform draws:

    - ``op`` (int64): index into :attr:`DSA.ops` of the op the group applies in mode ``'S'`` (ignored in 'M');
    - ``brightness``: additive shift (identity 0); ``saturation``, ``contrast``: multiplicative factors
      (identity 1);
    - ``shift_x``, ``shift_y`` (int64): crop translation in pixels along width / height; output pixel
      (i, j) reads input (i + shift_y, j + shift_x), zero outside (identity 0);
    - ``cutout_x``, ``cutout_y`` (int64): cutout centre column / row; the zeroed block covers columns
      [cutout_x - side_x//2, cutout_x - side_x//2 + side_x) and rows likewise (identity: far outside);
    - ``flip`` (bool): mirror along the width axis (identity False);
    - ``scale_x``, ``scale_y``: scale factors of the affine sampling grid (identity 1);
    - ``angle``: rotation angle in degrees (identity 0).
    """

    op: torch.Tensor
    brightness: torch.Tensor
    saturation: torch.Tensor
    contrast: torch.Tensor
    shift_x: torch.Tensor
    shift_y: torch.Tensor
    cutout_x: torch.Tensor
    cutout_y: torch.Tensor
    flip: torch.Tensor
    scale_x: torch.Tensor
    scale_y: torch.Tensor
    angle: torch.Tensor

    @staticmethod
    def identity(num_groups: int, device=None) -> AugDraw:
        """Parameters that make every op the identity, for ``num_groups`` groups (op index 0)."""
        check_positive_int("num_groups", num_groups, minimum=0)
        zl = torch.zeros(num_groups, dtype=torch.int64, device=device)
        zf = torch.zeros(num_groups, dtype=torch.float32, device=device)
        of = torch.ones(num_groups, dtype=torch.float32, device=device)
        far = torch.full((num_groups,), _CUTOUT_OUTSIDE, dtype=torch.int64, device=device)
        return AugDraw(
            op=zl, brightness=zf, saturation=of, contrast=of.clone(), shift_x=zl.clone(),
            shift_y=zl.clone(), cutout_x=far, cutout_y=far.clone(),
            flip=torch.zeros(num_groups, dtype=torch.bool, device=device),
            scale_x=of.clone(), scale_y=of.clone(), angle=zf.clone(),
        )

    @property
    def num_groups(self) -> int:
        """Number of groups ``G``."""
        return int(self.op.shape[0])

    def to(self, device) -> AugDraw:
        """A copy with every tensor on ``device`` (``self`` when already there)."""
        device = torch.device(device)
        if all(getattr(self, f.name).device == device for f in fields(self)):
            return self
        return AugDraw(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def index(self, idx: torch.Tensor) -> AugDraw:
        """Parameter sets ``idx`` (``[K]`` long) as a new ``K``-group draw."""
        return AugDraw(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def validate(self, name: str = "draw") -> AugDraw:
        """Check every field is a 1-d tensor of the same length with the documented dtype kind."""
        if not isinstance(self, AugDraw):
            raise TypeError(f"{name}: expected an AugDraw, got {type(self).__name__}")
        g = None
        for f in fields(self):
            t = getattr(self, f.name)
            if f.name in _LONG_FIELDS:
                dtypes = _INT_DTYPES
            elif f.name == "flip":
                dtypes = (torch.bool,)
            else:
                dtypes = _FLOAT_DTYPES
            check_tensor(f"{name}.{f.name}", t, ndim=1, dtypes=dtypes)
            if g is None:
                g = t.shape[0]
            elif t.shape[0] != g:
                raise ValueError(f"{name}.{f.name}: expected {g} groups like {name}.op, got {t.shape[0]}")
        return self


# ----------------------------------------------------------------------------------------------------
# The ops. Each takes images x [N, C, H, W] and per-sample parameters ([N] tensors on x's device) and is
# an exact identity at its identity parameters (the geometric op via an explicit torch.where).
# ----------------------------------------------------------------------------------------------------


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample values [N] as [N, 1, 1, 1] in x's dtype."""
    return v.to(x.dtype).view(-1, 1, 1, 1)


def apply_color(x: torch.Tensor, brightness: torch.Tensor, saturation: torch.Tensor,
                contrast: torch.Tensor) -> torch.Tensor:
    """Brightness, then saturation, then contrast, with per-sample parameters ``[N]``.

    brightness: ``x + b``; saturation: ``(x - m) * s + m`` with m the per-pixel channel mean (skipped for
    1 channel, where it is a no-op); contrast: ``(x - m) * c + m`` with m the per-image mean over C, H, W.
    The blends use ``torch.lerp(m, x, f)``, which is exactly ``x`` at ``f == 1``.
    """
    x = x + _bcast(brightness, x)
    if x.shape[1] > 1:
        x = torch.lerp(x.mean(dim=1, keepdim=True).expand_as(x), x, _bcast(saturation, x))
    return torch.lerp(x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x), x, _bcast(contrast, x))


def apply_crop(x: torch.Tensor, shift_x: torch.Tensor, shift_y: torch.Tensor) -> torch.Tensor:
    """Integer translation: ``out[n, :, i, j] = x[n, :, i + shift_y[n], j + shift_x[n]]``, zero outside."""
    n, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h) + shift_y.view(-1, 1)  # [N, H]
    cols = torch.arange(w, device=x.device).view(1, w) + shift_x.view(-1, 1)  # [N, W]
    valid = ((rows >= 0) & (rows < h)).view(n, 1, h, 1) & ((cols >= 0) & (cols < w)).view(n, 1, 1, w)
    src = rows.clamp(0, h - 1).view(n, h, 1) * w + cols.clamp(0, w - 1).view(n, 1, w)  # [N, H, W]
    out = x.reshape(n, c, h * w).gather(2, src.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)
    return torch.where(valid, out, torch.zeros((), dtype=x.dtype, device=x.device))


def apply_cutout(x: torch.Tensor, cutout_x: torch.Tensor, cutout_y: torch.Tensor,
                 size: Tuple[int, int]) -> torch.Tensor:
    """Zero the ``size = (side_y, side_x)`` block centred at (cutout_y, cutout_x), clipped to the image.

    Rows ``[cutout_y - side_y//2, cutout_y - side_y//2 + side_y)`` x columns likewise are set to 0.
    """
    n, _, h, w = x.shape
    sy, sx = size
    top = (cutout_y - sy // 2).view(-1, 1)
    left = (cutout_x - sx // 2).view(-1, 1)
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    rin = (rows >= top) & (rows < top + sy)  # [N, H]
    cin = (cols >= left) & (cols < left + sx)  # [N, W]
    cut = rin.view(n, 1, h, 1) & cin.view(n, 1, 1, w)
    return torch.where(cut, torch.zeros((), dtype=x.dtype, device=x.device), x)


def apply_flip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror along the width axis the samples with ``flip[n]`` True."""
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def apply_affine(x: torch.Tensor, scale_x: torch.Tensor, scale_y: torch.Tensor,
                 angle: torch.Tensor) -> torch.Tensor:
    """Scale then rotate as ONE resampling with per-sample parameters ``[N]`` (angle in degrees).

    theta = diag(scale_x, scale_y) @ [[cos a, -sin a], [sin a, cos a]] (translation 0); grid from
    ``F.affine_grid(theta, x.shape, align_corners=False)``, bilinear ``grid_sample`` with zero padding.
    With one factor the identity this is exactly the reference scale (or rotate) matrix. Samples whose
    parameters are exactly the identity are returned untouched (bit-exact).
    """
    n = x.shape[0]
    # The grid is built in at least float32 (affine_grid has no half kernels on every device).
    gdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    sx, sy = scale_x.to(gdt), scale_y.to(gdt)
    a = angle.to(gdt) * (math.pi / 180.0)
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(sx)
    theta = torch.stack([sx * cos, -sx * sin, zero, sy * sin, sy * cos, zero], dim=1).view(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False).to(x.dtype)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    keep = (scale_x == 1) & (scale_y == 1) & (angle == 0)
    return torch.where(keep.view(-1, 1, 1, 1), x, out)


class _GatherRows(torch.autograd.Function):
    """``pieces[j] = x[rows[j]]`` for index tensors ``rows`` that partition ``range(N)``.

    Adjoint of :class:`_ScatterRows` (each one's backward is the other), so the backward pass is one
    scatter of the pieces' gradients instead of a zero-filled ``[N, ...]`` buffer plus ``index_add``
    per piece; twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, *rows):
        ctx.rows = rows
        return tuple(x.index_select(0, r) for r in rows)

    @staticmethod
    def backward(ctx, *grads):
        return (_ScatterRows.apply(ctx.rows, *grads),) + (None,) * len(ctx.rows)


class _ScatterRows(torch.autograd.Function):
    """``out[rows[j]] = pieces[j]``: rows (index tensors) partition ``range(N)``, so every row is written."""

    @staticmethod
    def forward(ctx, rows, *pieces):
        ctx.rows = rows
        first = pieces[0]
        out = first.new_empty((sum(int(r.shape[0]) for r in rows),) + tuple(first.shape[1:]))
        for r, piece in zip(rows, pieces):
            out.index_copy_(0, r, piece)
        return out

    @staticmethod
    def backward(ctx, grad):
        return (None,) + tuple(_GatherRows.apply(grad, *ctx.rows))


def _check_group(name: str, group, n: int, num_groups: int, device) -> torch.Tensor:
    check_tensor(name, group, ndim=1, dtypes=_INT_DTYPES)
    if group.shape[0] != n:
        raise ValueError(f"{name}: expected {n} entries (one per sample), got {group.shape[0]}")
    if group.numel() and not torch.compiler.is_compiling():
        lo, hi = int(group.min()), int(group.max())
        if lo < 0 or hi >= num_groups:
            raise ValueError(f"{name}: values must lie in [0, {num_groups}), found range [{lo}, {hi}]")
    return group.to(device=device, dtype=torch.int64)


def _check_images(name: str, x) -> torch.Tensor:
    check_tensor(name, x, ndim=4, dtypes=_FLOAT_DTYPES)
    if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{name}: channels, height and width must be >= 1, got shape {tuple(x.shape)}")
    return x


def _check_generator(generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    return generator


class DSA:
    """Differentiable Siamese Augmentation with explicit, per-group parameters.

    ``strategy``: ops joined by ``_`` (subset of ``color_crop_cutout_flip_scale_rotate``; ``none`` or
    ``""`` is the identity). ``mode``: ``'S'`` applies one op per op group, ``'M'`` every op in strategy
    order (scale and rotate are then two separate resamplings, as in the reference).
    """

    def __init__(self, strategy: str = FULL_STRATEGY, params: DSAParams = DSAParams(), mode: str = "S"):
        self.ops: Tuple[str, ...] = parse_strategy(strategy)
        if not isinstance(params, DSAParams):
            raise TypeError(f"params: expected a DSAParams, got {type(params).__name__}")
        if mode not in ("S", "M"):
            raise ValueError(f"mode: expected 'S' or 'M', got {mode!r}")
        self.strategy = strategy
        self.params = params
        self.mode = mode

    def __repr__(self) -> str:
        return f"DSA(strategy={'_'.join(self.ops) or 'none'!r}, mode={self.mode!r}, params={self.params})"

    @property
    def enabled(self) -> bool:
        """False for the identity strategy (``none``)."""
        return bool(self.ops)

    # ------------------------------------------------------------------------------------------------
    def draw(self, num_groups: int, generator: torch.Generator, image_size: Tuple[int, int],
             op_groups: Optional[torch.Tensor] = None, *, device=None) -> AugDraw:
        """Draw ``num_groups`` independent parameter sets for images of ``image_size = (H, W)``.

        The op choice (mode 'S') is drawn once per op group: ``op_groups`` ([G] long, values in [0, G))
        maps each group to its op group, groups of one op group get the same op (default: every group
        its own op group). Every parameter is drawn for every group, whatever the strategy, in a fixed
        order, so the generator stream does not depend on the strategy. Draws happen on
        ``generator.device``; the result is moved to ``device`` when given.

        Ranges (r ~ U[0,1)): brightness (r-0.5)*brightness; saturation r*saturation; contrast
        r+contrast; shift_y, shift_x uniform integers in [-s, s] with s = int(size*ratio_crop_pad+0.5);
        cutout_y in [0, H + 1 - side_y%2), cutout_x in [0, W + 1 - side_x%2); flip r < prob_flip;
        scale_x, scale_y ~ U[1/ratio_scale, ratio_scale); angle ~ U[-ratio_rotate, ratio_rotate) degrees.
        """
        check_positive_int("num_groups", num_groups, minimum=0)
        _check_generator(generator)
        if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in image_size)):
            raise ValueError(f"image_size: expected (H, W) with positive ints, got {image_size!r}")
        h, w = int(image_size[0]), int(image_size[1])
        g, gd, p = num_groups, generator.device, self.params

        def rand():
            return torch.rand(g, generator=generator, device=gd)

        def randint(lo, hi):  # uniform integers in [lo, hi)
            return torch.randint(lo, hi, (g,), generator=generator, device=gd)

        k = len(self.ops)
        op = randint(0, k) if k > 0 else torch.zeros(g, dtype=torch.int64, device=gd)
        if op_groups is not None:
            op_groups = _check_group("op_groups", op_groups, g, max(g, 1), gd)
            op = op[op_groups]
        brightness = (rand() - 0.5) * p.brightness
        saturation = rand() * p.saturation
        contrast = rand() + p.contrast
        csy, csx = crop_size((h, w), p.ratio_crop_pad)
        shift_y = randint(-csy, csy + 1)
        shift_x = randint(-csx, csx + 1)
        sy, sx = cutout_size((h, w), p.ratio_cutout)
        cutout_y = randint(0, h + (1 - sy % 2))
        cutout_x = randint(0, w + (1 - sx % 2))
        flip = rand() < p.prob_flip
        lo = 1.0 / p.ratio_scale
        scale_x = rand() * (p.ratio_scale - lo) + lo
        scale_y = rand() * (p.ratio_scale - lo) + lo
        angle = (rand() - 0.5) * (2.0 * p.ratio_rotate)
        out = AugDraw(op=op, brightness=brightness, saturation=saturation, contrast=contrast,
                      shift_x=shift_x, shift_y=shift_y, cutout_x=cutout_x, cutout_y=cutout_y,
                      flip=flip, scale_x=scale_x, scale_y=scale_y, angle=angle)
        return out if device is None else out.to(device)

    # ------------------------------------------------------------------------------------------------
    def _effective(self, draw: AugDraw) -> AugDraw:
        """Per-group parameters with every op not applied by a group set to its identity parameters.

        An op is applied by a group when it is in the strategy and (mode 'S') it is the group's op. Used
        by the dense path (mode 'M', and mode 'S' under ``torch.compile``); eager mode 'S' runs
        :meth:`_apply_chosen` instead, which gives bit-identical results.
        """
        ident = AugDraw.identity(draw.num_groups, draw.op.device)
        out = {}
        for op_name, names in (("color", ("brightness", "saturation", "contrast")),
                               ("crop", ("shift_x", "shift_y")), ("cutout", ("cutout_x", "cutout_y")),
                               ("flip", ("flip",)), ("scale", ("scale_x", "scale_y")), ("rotate", ("angle",))):
            if op_name not in self.ops:
                use = None
            elif self.mode == "M":
                use = True
            else:
                use = draw.op == self.ops.index(op_name)
            for name in names:
                v, i = getattr(draw, name), getattr(ident, name)
                if use is None:
                    out[name] = i
                elif use is True:
                    out[name] = v
                else:
                    out[name] = torch.where(use, v, i.to(v.dtype))
        out["op"] = draw.op
        return AugDraw(**out)

    def apply(self, x: torch.Tensor, draw: AugDraw, group: torch.Tensor) -> torch.Tensor:
        """Augment ``x`` ``[N, C, H, W]``: sample ``i`` gets the transform of group ``group[i]``.

        ``draw`` holds G parameter sets (moved to x's device if needed); ``group`` is ``[N]`` long with
        values in [0, G). Returns ``[N, C, H, W]`` in x's dtype, differentiable w.r.t. ``x``. For the
        identity strategy ``x`` itself is returned.
        """
        _check_images("x", x)
        if not isinstance(draw, AugDraw):
            raise TypeError(f"draw: expected an AugDraw, got {type(draw).__name__}")
        draw.validate("draw")
        group = _check_group("group", group, x.shape[0], draw.num_groups, x.device)
        if not self.ops:
            return x
        draw = draw.to(x.device)
        if self.mode == "S" and draw.num_groups and not torch.compiler.is_compiling():
            lo, hi = int(draw.op.min()), int(draw.op.max())
            if lo < 0 or hi >= len(self.ops):
                raise ValueError(f"draw.op: values must lie in [0, {len(self.ops)}) for strategy "
                                 f"{'_'.join(self.ops)!r}, found range [{lo}, {hi}]")
        if self.mode == "S" and not torch.compiler.is_compiling():
            return self._apply_chosen(x, draw, group)
        # Mode 'M', or mode 'S' under torch.compile (no data-dependent shapes there): every op of the
        # strategy on every sample, with identity parameters where a sample does not apply the op.
        p = self._effective(draw).index(group)  # per-sample parameters [N]
        h, w = x.shape[-2:]
        fused_geometry = self.mode == "S"  # one op per sample: scale and rotate never compose
        geometry_done = False
        for name in self.ops:
            if name == "color":
                x = apply_color(x, p.brightness, p.saturation, p.contrast)
            elif name == "crop":
                x = apply_crop(x, p.shift_x, p.shift_y)
            elif name == "cutout":
                x = apply_cutout(x, p.cutout_x, p.cutout_y, cutout_size((h, w), self.params.ratio_cutout))
            elif name == "flip":
                x = apply_flip(x, p.flip)
            elif fused_geometry:
                if not geometry_done:
                    x = apply_affine(x, p.scale_x, p.scale_y, p.angle)
                    geometry_done = True
            elif name == "scale":
                x = apply_affine(x, p.scale_x, p.scale_y, torch.zeros_like(p.angle))
            else:  # rotate
                x = apply_affine(x, torch.ones_like(p.scale_x), torch.ones_like(p.scale_y), p.angle)
        return x

    def _apply_op(self, name: str, x: torch.Tensor, p: AugDraw) -> torch.Tensor:
        """Op ``name`` alone on ``x`` ``[N, C, H, W]`` with per-sample parameters ``p`` (``[N]`` fields).

        ``scale`` and ``rotate`` are each one resampling with the other factor at its identity (angle 0,
        resp. scales 1): the same theta the fused mode-'S' geometry of :meth:`_effective` gives.
        """
        if name == "color":
            return apply_color(x, p.brightness, p.saturation, p.contrast)
        if name == "crop":
            return apply_crop(x, p.shift_x, p.shift_y)
        if name == "cutout":
            size = cutout_size(tuple(x.shape[-2:]), self.params.ratio_cutout)
            return apply_cutout(x, p.cutout_x, p.cutout_y, size)
        if name == "flip":
            return apply_flip(x, p.flip)
        if name == "scale":
            return apply_affine(x, p.scale_x, p.scale_y, torch.zeros_like(p.angle))
        return apply_affine(x, torch.ones_like(p.scale_x), torch.ones_like(p.scale_y), p.angle)  # rotate

    def _apply_chosen(self, x: torch.Tensor, draw: AugDraw, group: torch.Tensor) -> torch.Tensor:
        """Mode 'S': each sample gets ONLY the op its group chose (``draw.op[group]``).

        The rows are partitioned by op index (a stable sort, then one contiguous run per op), each op runs
        once on the rows that chose it, with their parameters, and the results are scattered back to
        those rows (``index_copy``); no op is computed for samples that do not apply it (and when the
        whole batch applies one op, it runs on ``x`` directly, unpermuted). Every op acts on each sample
        independently, so this is bit-identical to applying every op with identity parameters to the
        samples that did not choose it (the dense formulation, kept for mode 'M' and for mode 'S' under
        ``torch.compile``). Differentiable (twice) w.r.t. ``x``; consumes no random numbers.

        Host sync: one per call, reading the per-op sample counts (``bincount(...).tolist()``) that size
        the slices; the rest stays on x's device.
        """
        n = x.shape[0]
        if n == 0:
            return x.clone()
        op = draw.op[group]  # [N] op index of each sample
        counts = torch.bincount(op, minlength=len(self.ops)).tolist()  # host sync (slice sizes)
        present = [k for k, c in enumerate(counts) if c]
        if len(present) == 1:  # one op for the whole batch (e.g. per_sample's default): no permutation
            return self._apply_op(self.ops[present[0]], x, draw.index(group))
        # Stable sort by op: rows[j] = the samples (in batch order) whose op is present[j].
        order = torch.argsort(op, stable=True)
        sizes = [counts[k] for k in present]
        rows = order.split(sizes)
        pieces = _GatherRows.apply(x, *rows)
        p = draw.index(group.index_select(0, order))  # per-sample parameters in sorted order, split per op
        params = [AugDraw(*v) for v in zip(*(getattr(p, f.name).split(sizes) for f in fields(AugDraw)))]
        out = [self._apply_op(self.ops[k], pieces[j], params[j]) for j, k in enumerate(present)]
        return _ScatterRows.apply(rows, *out)

    # ------------------------------------------------------------------------------------------------
    def siamese(self, real: torch.Tensor, real_group: torch.Tensor, syn: torch.Tensor,
                syn_group: torch.Tensor, num_groups: int,
                generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """DM-style Siamese augmentation: ONE draw per group, applied identically to real and synthetic.

        real ``[Nr, C, H, W]`` with ``real_group`` ``[Nr]``, syn ``[Ns, C, H, W]`` with ``syn_group``
        ``[Ns]`` (values in [0, num_groups), e.g. class labels). Every group draws its own op (mode 'S')
        and parameters. Returns ``(real_aug [Nr, C, H, W], syn_aug [Ns, C, H, W])``.
        """
        _check_images("real", real)
        _check_images("syn", syn)
        if syn.shape[1:] != real.shape[1:]:
            raise ValueError(f"syn: expected per-sample shape {tuple(real.shape[1:])} like real, "
                             f"got {tuple(syn.shape[1:])}")
        check_positive_int("num_groups", num_groups, minimum=1)
        _check_generator(generator)
        real_group = _check_group("real_group", real_group, real.shape[0], num_groups, real.device)
        syn_group = _check_group("syn_group", syn_group, syn.shape[0], num_groups, syn.device)
        d = self.draw(num_groups, generator, tuple(real.shape[-2:]), device=syn.device)
        return self.apply(real, d, real_group), self.apply(syn, d, syn_group)

    def per_sample(self, x: torch.Tensor, generator: torch.Generator,
                   op_groups: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Evaluation-mode augmentation of ``x`` ``[N, C, H, W]`` with independent parameters per sample.

        In mode 'S' one op is chosen for the whole call, unless ``op_groups`` (``[N]`` long, values in
        [0, N)) says which samples share an op choice (e.g. the model index when several models are
        trained on one stacked batch). Returns ``[N, C, H, W]``.
        """
        _check_images("x", x)
        _check_generator(generator)
        n = x.shape[0]
        if op_groups is None:
            op_groups = torch.zeros(n, dtype=torch.int64, device=generator.device)
        d = self.draw(n, generator, tuple(x.shape[-2:]), op_groups=op_groups, device=x.device)
        return self.apply(x, d, torch.arange(n, device=x.device))
