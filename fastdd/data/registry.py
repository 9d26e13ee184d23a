"""Dataset name -> reader, path resolution and normalisation: :func:`load_dataset`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .cifar import is_cifar10_dir, is_cifar100_dir, read_cifar10, read_cifar100
from .dataset import ImageDataset, _check_size, normalize_pixels
from .digits import read_digits
from .folder import (
    DECODERS,
    check_resize,
    image_size_of,
    is_tiny_imagenet_dir,
    load_images,
    scan_image_folder,
    scan_tiny_imagenet,
)
from .idx import is_idx_dir, read_idx_split
from .lazy import LazyImageFolder
from .paths import DatasetNotFoundError, find_dataset_dir
from .stats import get_stats


@dataclass(frozen=True)
class DatasetSpec:
    """How to find and read one named dataset."""

    name: str
    subdirs: Tuple[str, ...]  # sub-folder names under a search parent; () = needs no path / explicit root
    is_dataset_dir: Optional[Callable[[Path], bool]]
    splits: Tuple[str, ...] = ("train", "test")
    hint: str = ""


_SPECS: Dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            "fashion-mnist",
            ("fashion-mnist", "FashionMNIST", "FashionMNIST/raw", "fashion_mnist", "fashionmnist"),
            is_idx_dir,
            hint="On Debian/Ubuntu: apt-get install dataset-fashion-mnist (installs /usr/share/datasets/fashion-mnist).",
        ),
        DatasetSpec(
            "mnist",
            ("mnist", "MNIST/raw", "MNIST"),
            is_idx_dir,
            hint="Get the four IDX files (train/t10k images/labels, .gz is fine) into a folder named mnist.",
        ),
        DatasetSpec(
            "cifar10",
            ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "CIFAR10/cifar-10-batches-py", "cifar10"),
            is_cifar10_dir,
            hint="Get the CIFAR-10 'python version' archive (cifar-10-python.tar.gz) and extract it.",
        ),
        DatasetSpec(
            "cifar100",
            ("cifar-100-python", "cifar100/cifar-100-python", "CIFAR100/cifar-100-python", "cifar100"),
            is_cifar100_dir,
            hint="Get the CIFAR-100 'python version' archive (cifar-100-python.tar.gz) and extract it.",
        ),
        DatasetSpec(
            "tiny-imagenet",
            ("tiny-imagenet-200", "tiny-imagenet", "tinyimagenet"),
            is_tiny_imagenet_dir,
            splits=("train", "test", "val"),
            hint="Get tiny-imagenet-200.zip and extract it (train/<wnid>/images, val/val_annotations.txt).",
        ),
        DatasetSpec("digits", (), None),
        DatasetSpec("imagefolder", (), None, splits=()),  # any split folder name
    )
}

_ALIASES: Dict[str, str] = {
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "mnist": "mnist",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "digits": "digits",
    "tinyimagenet": "tiny-imagenet",
    "tinyimagenet200": "tiny-imagenet",
    "imagefolder": "imagefolder",
}


def dataset_names() -> List[str]:
    """Canonical names accepted by :func:`load_dataset` (sorted)."""
    return sorted(_SPECS)


def canonical_name(name: str) -> str:
    """Map a user-supplied dataset name (case-insensitive, ``_``/``-`` tolerant, aliases) to its canonical form.

    Raises ``ValueError`` listing the valid names.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "").replace("-", "").replace(" ", "")
    try:
        return _ALIASES[key]
    except KeyError:
        raise ValueError(
            f"name: unknown dataset '{name}'; valid names: {', '.join(dataset_names())} "
            "(aliases: fashionmnist, fmnist)"
        ) from None


def _stats_for(canon: str, mean, std):
    if (mean is None) != (std is None):
        raise ValueError("mean/std: give both or neither")
    if mean is None:
        return get_stats(canon)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != len(std) or not mean:
        raise ValueError(f"mean/std: need the same positive number of values, got {len(mean)} and {len(std)}")
    return mean, std


def load_dataset(
    name: str,
    split: str = "train",
    root: Union[str, os.PathLike[str], None] = None,
    image_size: Optional[Tuple[int, int]] = None,
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    lazy: Union[bool, str] = False,
    resize: str = "direct",
    crop_fraction: float = 0.875,
    decoder: str = "auto",
) -> Union[ImageDataset, LazyImageFolder]:
    """Load one split of a named dataset, normalised per channel: in memory, or decoded on demand.

    ``name``: one of :func:`dataset_names` (case-insensitive; ``fashionmnist``/``fmnist`` are aliases).
    ``split``: ``train`` or ``test`` (Tiny-ImageNet: ``val`` = ``test``; imagefolder: any sub-folder).
    ``root``: the dataset directory or a parent of it (see :mod:`fastdd.data.paths` for the search order;
    required for ``imagefolder``, ignored for ``digits``). ``image_size=(H, W)`` resizes (Pillow for image
    folders, antialiased bilinear otherwise); image folders without it take the first image's size.
    ``mean``/``std`` override the table in :mod:`fastdd.data.stats` (for imagefolder, one value means
    grayscale images).

    Returns an :class:`ImageDataset` with images float32 ``[N, C, H, W]`` = ``(x/255 - mean_c)/std_c`` and
    labels int64 ``[N]``. Raises :class:`DatasetNotFoundError` when the files are not found.

    File trees (``imagefolder``, ``tiny-imagenet``) can instead be read lazily: ``lazy=True`` returns a
    :class:`~fastdd.data.lazy.LazyImageFolder` (the file index only; one image decoded per item);
    ``lazy="auto"`` does so when the split's float32 tensor would exceed :data:`LAZY_AUTO_BYTES`
    (N x C x H x W x 4 bytes, H x W = ``image_size`` or the first image's size), else reads it into
    memory as ``lazy=False`` does. ``lazy=True`` on the other formats (small, stored as arrays) is a
    ValueError. ``resize`` (``direct`` | ``center_crop``) and ``crop_fraction``: the resize rule of
    :mod:`fastdd.data.folder` (file trees only). ``decoder`` (``auto`` | ``pil`` | ``torchvision``): the
    lazy decoder (the in-memory reader always uses Pillow, as does ``pil``).
    """
    canon = canonical_name(name)
    spec = _SPECS[canon]
    if not isinstance(split, str) or not split:
        raise ValueError(f"split: expected a non-empty str, got {split!r}")
    split = split.strip().lower() if spec.splits else split
    if spec.splits and split not in spec.splits:
        raise ValueError(f"split: '{split}' is not a split of {canon}; valid: {', '.join(spec.splits)}")
    if canon == "tiny-imagenet" and split == "val":
        split = "test"
    size = _check_size(image_size) if image_size is not None else None
    mean_, std_ = _stats_for(canon, mean, std)
    if lazy not in (True, False, "auto"):
        raise ValueError(f"lazy: expected True, False or 'auto', got {lazy!r}")
    check_resize(resize, crop_fraction)
    if decoder not in DECODERS:
        raise ValueError(f"decoder: expected one of {list(DECODERS)}, got {decoder!r}")
    if lazy is True and canon not in FILE_TREES:
        raise ValueError(f"lazy: {canon} is read from array files into memory; lazy reading is for the file trees "
                         f"({', '.join(FILE_TREES)})")

    if canon == "digits":
        pixels, labels, names = read_digits(split)
        scale = 16.0
    elif canon == "imagefolder":
        if root is None:
            raise DatasetNotFoundError(
                "dataset 'imagefolder' needs an explicit root (--data-path / root=...) laid out as "
                "root/<split>/<class>/<image files>",
                dataset=canon,
            )
        root_p = Path(root).expanduser()
        if not root_p.is_dir():
            raise DatasetNotFoundError(
                f"dataset 'imagefolder': root {root_p} is not a directory (searched: {root_p})",
                dataset=canon,
                searched=[str(root_p)],
            )
        if len(mean_) not in (1, 3):
            raise ValueError(f"channels: image folders are read as 1 (L) or 3 (RGB) channels, got {len(mean_)}")
        files, labels, names = scan_image_folder(root_p, split)
        scale = 255.0
    else:
        directory = find_dataset_dir(canon, spec.subdirs, spec.is_dataset_dir, root, hint=spec.hint)
        if canon in ("fashion-mnist", "mnist"):
            pixels, labels = read_idx_split(directory, split)
            names = _IDX_CLASS_NAMES[canon]
        elif canon == "cifar10":
            pixels, labels, names = read_cifar10(directory, split)
        elif canon == "cifar100":
            pixels, labels, names = read_cifar100(directory, split)
        else:  # tiny-imagenet
            files, labels, names = scan_tiny_imagenet(directory, split)
        scale = 255.0
    if canon in FILE_TREES:
        channels = len(mean_) if canon == "imagefolder" else 3
        if len(mean_) != channels:
            raise ValueError(f"mean/std: {canon} images have {channels} channels, got {len(mean_)} values")
        if lazy == "auto":
            h, w = size or image_size_of(files[0])
            lazy = len(files) * channels * h * w * 4 > LAZY_AUTO_BYTES
        if lazy:
            return LazyImageFolder(files, labels, names, name=canon, split=split, mean=mean_, std=std_,
                                   image_size=size, resize=resize, crop_fraction=crop_fraction, decoder=decoder)
        pixels = load_images(files, size, channels, resize, crop_fraction)

    num_classes = len(names)
    labels_t = torch.from_numpy(labels)
    if labels_t.numel() and (int(labels_t.min()) < 0 or int(labels_t.max()) >= num_classes):
        raise ValueError(
            f"{canon} {split}: labels span [{int(labels_t.min())}, {int(labels_t.max())}] "
            f"but there are {num_classes} classes"
        )
    images = normalize_pixels(pixels, mean_, std_, scale=scale, image_size=size)
    return ImageDataset(
        name=canon, split=split, images=images, labels=labels_t, num_classes=num_classes,
        class_names=list(names), mean=mean_, std=std_,
    )


#: the datasets stored as image files, which can be read lazily
FILE_TREES = ("imagefolder", "tiny-imagenet")
#: ``load_dataset(lazy="auto")`` reads a file tree lazily when its float32 tensor would exceed this many bytes
LAZY_AUTO_BYTES = 2 << 30

_IDX_CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}
