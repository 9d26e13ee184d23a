"""Adapter from any map-style ``torch.utils.data.Dataset`` (torchvision's included) to :class:`ImageDataset`.

torchvision is never imported here; a torchvision dataset constructed without ``transform`` yields
``(PIL.Image, int)`` items, which is one of the accepted forms.
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..validation import check_positive_int
from .dataset import ImageDataset, normalize_pixels


def _image_to_float(img, channels: int, index: int) -> torch.Tensor:
    """One dataset item's image as float32 ``[C, H, W]`` in [0, 1].

    Accepted: a PIL image (converted to L/RGB to match ``channels``); a tensor ``[C, H, W]`` or ``[H, W]``
    (uint8 is divided by 255, floats are taken as [0, 1]); a numpy array ``[H, W]`` or ``[H, W, C]``
    (the layout ``np.asarray(pil_image)`` gives; uint8 divided by 255, floats taken as [0, 1]).
    """
    if hasattr(img, "convert") and hasattr(img, "size") and not isinstance(img, (torch.Tensor, np.ndarray)):
        mode = {1: "L", 3: "RGB"}.get(channels)
        if mode is not None and img.mode != mode:
            img = img.convert(mode)
        a = np.asarray(img)
        t = torch.from_numpy(a.copy())
        t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    elif isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.dim() == 2:
            t = t[None]
    elif isinstance(img, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(img))
        t = t[None] if t.dim() == 2 else t.permute(2, 0, 1) if t.dim() == 3 else t
    else:
        raise TypeError(
            f"dataset[{index}]: image of type {type(img).__name__} not supported "
            "(expected a PIL image, a tensor [C, H, W] or a numpy array [H, W(, C)])"
        )
    if t.dim() != 3:
        raise ValueError(f"dataset[{index}]: expected a [C, H, W] image, got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)
    if not t.is_floating_point():
        raise TypeError(f"dataset[{index}]: image dtype {t.dtype} not supported (uint8 or floating in [0, 1])")
    return t.to(torch.float32)


def from_torch_dataset(
    dataset,
    name: str,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: Optional[int] = None,
    *,
    split: str = "train",
    class_names: Optional[Sequence[str]] = None,
    image_size: Optional[Tuple[int, int]] = None,
) -> ImageDataset:
    """Materialise a map-style dataset of ``(image, label)`` items into an :class:`ImageDataset`.

    Each image may be a PIL image, a tensor ``[C, H, W]`` in [0, 1] (or uint8 0..255), or a uint8 numpy
    array ``[H, W]`` / ``[H, W, C]``; all must share one shape (or pass ``image_size`` to resize).
    Labels are ints (or 0-d tensors). ``num_classes`` defaults to ``max(label) + 1``; ``class_names`` to
    ``dataset.classes`` when present. Returns images float32 ``[N, C, H, W]`` normalised with
    ``mean``/``std`` (one value per channel; C = ``len(mean)``) and labels int64 ``[N]``.
    """
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != len(std) or not mean:
        raise ValueError(f"mean/std: need the same positive number of values, got {len(mean)} and {len(std)}")
    n = len(dataset)
    check_positive_int("len(dataset)", n)
    images: List[torch.Tensor] = []
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(f"dataset[{i}]: expected an (image, label) pair, got {type(item).__name__}")
        img, lab = item[0], item[1]
        if isinstance(lab, torch.Tensor):
            if lab.numel() != 1:
                raise ValueError(f"dataset[{i}]: label must be a single integer, got shape {tuple(lab.shape)}")
            lab = lab.item()
        if isinstance(lab, bool) or not isinstance(lab, numbers.Integral):
            raise TypeError(f"dataset[{i}]: label must be an integer, got {type(lab).__name__}")
        labels[i] = int(lab)
        t = _image_to_float(img, len(mean), i)
        if images and t.shape != images[0].shape and image_size is None:
            raise ValueError(
                f"dataset[{i}]: image shape {tuple(t.shape)} differs from dataset[0]'s {tuple(images[0].shape)}; "
                "pass image_size=(H, W) to resize"
            )
        if t.shape[0] != len(mean):
            raise ValueError(f"dataset[{i}]: {t.shape[0]} channels but {len(mean)} mean/std values")
        images.append(t)
    if image_size is not None:
        from .dataset import _check_size

        size = _check_size(image_size)
        x = torch.stack([normalize_pixels(t[None], (0.0,) * len(mean), (1.0,) * len(mean), scale=1.0,
                                          image_size=size)[0] for t in images])
    else:
        x = torch.stack(images)
    del images
    x = normalize_pixels(x, mean, std, scale=1.0)
    if labels.min() < 0:
        raise ValueError(f"labels: negative label {int(labels.min())}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if class_names is None:
        names = getattr(dataset, "classes", None)
        class_names = list(names) if names is not None and len(names) == num_classes else None
    return ImageDataset(
        name=name,
        split=split,
        images=x,
        labels=torch.from_numpy(labels),
        num_classes=int(num_classes),
        class_names=list(class_names) if class_names is not None else [],
        mean=mean,
        std=std,
    )
