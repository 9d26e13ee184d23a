"""The in-memory dataset type every reader returns, and the shared uint8 -> normalised conversion."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..validation import check_labels, check_positive_int, check_tensor


def _stats_view(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a [C, 1, 1] tensor with ``like``'s dtype and device (broadcasts over [..., C, H, W])."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return torch.tensor(tuple(values), dtype=dtype, device=like.device).view(-1, 1, 1)


@dataclass(eq=False)
class ImageDataset:
    """A whole labelled image split held in memory as tensors.

    - ``images``: float32 ``[N, C, H, W]``, already normalised per channel: ``(x/255 - mean_c) / std_c``
      (``x/16`` for digits).
    - ``labels``: int64 ``[N]`` in ``[0, num_classes)``.
    - ``class_names``: ``num_classes`` strings; ``mean``/``std``: one float per channel.
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: List[str] = field(default_factory=list)
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check_tensor("images", self.images, ndim=4, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
        check_positive_int("num_classes", self.num_classes)
        if self.labels.dtype != torch.int64:
            check_tensor("labels", self.labels, ndim=1, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8))
            self.labels = self.labels.long()
        check_labels("labels", self.labels, self.num_classes, length=self.images.shape[0])
        if self.labels.device != self.images.device:
            raise ValueError(f"labels: on device {self.labels.device}, images on {self.images.device}")
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        c = self.images.shape[1]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(
                f"mean/std: need one value per channel ({c}), got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: must be positive, got {self.std}")
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
        self.class_names = [str(n) for n in self.class_names]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names: expected {self.num_classes} names, got {len(self.class_names)}")

    # ----------------------------------------------------------------------------------------------
    @property
    def channels(self) -> int:
        """Number of image channels C."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> Tuple[int, int]:
        """``(H, W)``."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def device(self) -> torch.device:
        """Device of ``images`` and ``labels``."""
        return self.images.device

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape={tuple(self.images.shape[1:])}, num_classes={self.num_classes}, device={self.device})"
        )

    # ----------------------------------------------------------------------------------------------
    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised images ``[..., C, H, W]`` back to pixel space ``x*std + mean``, clamped to [0, 1]."""
        check_tensor("x", x)
        if x.dim() < 3 or x.shape[-3] != self.channels:
            raise ValueError(f"x: expected [..., {self.channels}, H, W], got shape {tuple(x.shape)}")
        x = x if x.is_floating_point() else x.float()
        return (x * _stats_view(self.std, x) + _stats_view(self.mean, x)).clamp_(0.0, 1.0)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Map pixel-space images ``[..., C, H, W]`` in [0, 1] to the normalised space (no clamping)."""
        check_tensor("x01", x01)
        if x01.dim() < 3 or x01.shape[-3] != self.channels:
            raise ValueError(f"x01: expected [..., {self.channels}, H, W], got shape {tuple(x01.shape)}")
        x01 = x01 if x01.is_floating_point() else x01.float()
        return (x01 - _stats_view(self.mean, x01)) / _stats_view(self.std, x01)

    def to(self, device: Union[str, torch.device]) -> ImageDataset:
        """A copy whose ``images`` and ``labels`` live on ``device`` (the same object if already there)."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def class_counts(self) -> torch.Tensor:
        """Number of images per class, int64 ``[num_classes]`` (on the labels' device)."""
        return torch.bincount(self.labels, minlength=self.num_classes)


# --------------------------------------------------------------------------------------------------
def normalize_pixels(
    pixels: Union[np.ndarray, torch.Tensor],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    scale: float = 255.0,
    image_size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Turn raw pixels ``[N, C, H, W]`` (uint8 or float, values in [0, scale]) into normalised float32.

    Computes ``(x/scale - mean_c)/std_c`` in place on one float32 copy. When ``image_size=(H', W')``
    differs from ``(H, W)`` the [0, 1] images are first resized (bilinear, antialiased).
    Returns float32 ``[N, C, H', W']``.
    """
    x = torch.from_numpy(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else pixels
    if x.dim() != 4:
        raise ValueError(f"pixels: expected [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"mean/std: need one value per channel ({x.shape[1]}), got {len(mean)} and {len(std)}")
    x = x.to(torch.float32, copy=True).div_(scale)
    if image_size is not None:
        image_size = _check_size(image_size)
        if tuple(x.shape[2:]) != image_size and x.shape[0] > 0:
            x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False, antialias=True)
            x.clamp_(0.0, 1.0)
    x.sub_(_stats_view(mean, x)).div_(_stats_view(std, x))
    return x


def _check_size(image_size) -> Tuple[int, int]:
    """Validate ``image_size`` as a pair of positive ints ``(H, W)`` (an int means square)."""
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        h, w = image_size
    except (TypeError, ValueError):
        raise ValueError(f"image_size: expected (H, W), got {image_size!r}") from None
    return check_positive_int("image_size[0]", h), check_positive_int("image_size[1]", w)
