"""LowRankImages: a synthetic image set stored as per-plane low-rank factors (spec section 1).

``images[n, c] = factor_a[n, c] @ factor_b[n, c]`` with ``factor_a`` [N, C, H, r] and ``factor_b``
[N, C, r, W] as ``nn.Parameter`` s; :meth:`forward` rebuilds the images through the fused op
:func:`fastdd.ops.lowrank.lowrank_reconstruct`. An optimizer over ``module.parameters()`` then trains the
factors (the reference uses SGD with momentum 0.5 on both). A saved set stores :meth:`factors` instead of
images; they reload with :meth:`from_factors`, or without fastdd as ``factor_a @ factor_b``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from fastdd.ops import lowrank as _ops
from fastdd.ops._common import check_backend_name


class LowRankImages(nn.Module):
    """``forward() -> images [N, C, H, W]`` (factor dtype), differentiable w.r.t. both factors.

    Construct with :meth:`from_noise` (the reference initialisation: both factors i.i.d. N(0, 1), so each
    pixel has mean 0 and variance r), :meth:`from_real` (truncated-SVD projection of real images: the best
    rank-r approximation of every plane) or :meth:`from_factors` / ``LowRankImages(factor_a, factor_b)``.
    backend: None (automatic / ``FASTDD_BACKEND``) or one of "triton", "cuda", "cpp", "torch".
    """

    def __init__(self, factor_a: torch.Tensor, factor_b: torch.Tensor, backend: Optional[str] = None):
        super().__init__()
        check_backend_name(backend)
        _ops.validate_factors(factor_a, factor_b, check_finite=True)
        self.factor_a = nn.Parameter(factor_a.detach().clone().contiguous())
        self.factor_b = nn.Parameter(factor_b.detach().clone().contiguous())
        self.backend = backend

    # ------------------------------------------------------------------------------------ constructors
    @classmethod
    def from_factors(cls, factor_a: torch.Tensor, factor_b: torch.Tensor, *,
                     backend: Optional[str] = None) -> LowRankImages:
        """From saved factors (copied; e.g. the dict returned by :meth:`factors`)."""
        return cls(factor_a, factor_b, backend=backend)

    @classmethod
    def from_real(cls, images: torch.Tensor, rank: int, *, backend: Optional[str] = None) -> LowRankImages:
        """Projection init: factors of the best rank-``rank`` approximation of each plane of ``images``
        [N, C, H, W] (truncated SVD, see :func:`fastdd.ops.lowrank.lowrank_project`)."""
        a, b = _ops.lowrank_project(images, rank)
        return cls(a, b, backend=backend)

    @classmethod
    def from_noise(cls, num_images: int, channels: int, height: int, width: int, rank: int,
                   generator: torch.Generator, device=None, *, dtype: torch.dtype = torch.float32,
                   backend: Optional[str] = None) -> LowRankImages:
        """Reference init: A [N, C, H, r] then B [N, C, r, W], i.i.d. N(0, 1) drawn in that order from
        ``generator`` on the generator's device, then moved to ``device`` (default: the generator's)."""
        for name, v in (("num_images", num_images), ("channels", channels), ("height", height),
                        ("width", width), ("rank", rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        if rank > min(height, width):
            raise ValueError(f"rank: {rank} exceeds min(H, W) = {min(height, width)} of {height}x{width} images")
        gen_device = generator.device
        a = torch.randn((num_images, channels, height, rank), generator=generator, device=gen_device, dtype=dtype)
        b = torch.randn((num_images, channels, rank, width), generator=generator, device=gen_device, dtype=dtype)
        if device is not None:
            a, b = a.to(device), b.to(device)
        return cls(a, b, backend=backend)

    # --------------------------------------------------------------------------------------- forward
    def forward(self) -> torch.Tensor:
        return _ops.lowrank_reconstruct(self.factor_a, self.factor_b, backend=self.backend)

    # ------------------------------------------------------------------------------------ properties
    @property
    def rank(self) -> int:
        return int(self.factor_a.shape[3])

    @property
    def num_images(self) -> int:
        return int(self.factor_a.shape[0])

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one reconstructed image."""
        return (int(self.factor_a.shape[1]), int(self.factor_a.shape[2]), int(self.factor_b.shape[3]))

    def stored_floats(self) -> int:
        """Floats stored by the set: ``N * C * r * (H + W)`` (= factor_a.numel() + factor_b.numel())."""
        return int(self.factor_a.numel() + self.factor_b.numel())

    def factors(self) -> Dict[str, torch.Tensor]:
        """{"factor_a": [N, C, H, r], "factor_b": [N, C, r, W]}: detached contiguous CPU copies."""
        return {"factor_a": self.factor_a.detach().to("cpu", copy=True).contiguous(),
                "factor_b": self.factor_b.detach().to("cpu", copy=True).contiguous()}

    def extra_repr(self) -> str:
        c, h, w = self.image_shape
        return f"num_images={self.num_images}, image_shape=({c}, {h}, {w}), rank={self.rank}, backend={self.backend!r}"
