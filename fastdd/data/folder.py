"""Class-folder image trees (ImageNet layout) and Tiny-ImageNet.

Generic layout: ``root/<split>/<class>/**/*.{png,jpg,jpeg,bmp}`` (extension case-insensitive). Class
names are the sorted sub-folder names of ``root/train`` when it exists (so every split gets the same
label ids), else of ``root/<split>``.

Tiny-ImageNet (``tiny-imagenet-200/``): ``train/<wnid>/images/*.JPEG`` (or ``train/<wnid>/*``); the
validation split is either ``val/val_annotations.txt`` (``file<TAB>wnid<TAB>...`` lines) with the
images in ``val/images/``, or ``val/<wnid>/*``. As in DM, the validation split serves as the test
split (``split="test"`` and ``split="val"`` both read ``val/``).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .paths import DatasetNotFoundError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _class_dirs(split_dir: Path) -> List[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _files_under(directory: Path) -> List[Path]:
    """Image files below ``directory`` (recursively), in a deterministic sorted order."""
    out: List[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f))
    return out


def scan_class_folders(split_dir: Path, classes: Sequence[str]) -> Tuple[List[Path], np.ndarray]:
    """List ``split_dir/<class>/**/image`` for the given ``classes`` (label = position in ``classes``).

    Returns ``(files, labels int64 [N])``. Folders not in ``classes`` are an error (labels would clash).
    """
    present = _class_dirs(split_dir)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise ValueError(f"{split_dir}: class folders {unknown[:5]} are not among the {len(classes)} known classes")
    files: List[Path] = []
    labels: List[int] = []
    for idx, c in enumerate(classes):
        d = split_dir / c
        if d.is_dir():
            fs = _files_under(d)
            files.extend(fs)
            labels.extend([idx] * len(fs))
    if not files:
        raise DatasetNotFoundError(f"{split_dir}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found")
    return files, np.asarray(labels, dtype=np.int64)


def load_images(
    files: Sequence[Path], image_size: Optional[Tuple[int, int]] = None, channels: int = 3
) -> np.ndarray:
    """Decode image files with Pillow into uint8 ``[N, C, H, W]``.

    Every image is converted to RGB (``channels=3``) or grayscale (``channels=1``) and resized
    (bilinear) to ``image_size=(H, W)``; when ``image_size`` is None it is the size of ``files[0]``.
    Decoding runs in a small thread pool (Pillow releases the GIL while decoding).
    """
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels: image folders are read as 1 (L) or 3 (RGB) channels, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    if not files:
        raise ValueError("files: empty")
    if image_size is None:
        with Image.open(files[0]) as im:
            image_size = (im.size[1], im.size[0])
    h, w = image_size
    out = np.empty((len(files), channels, h, w), dtype=np.uint8)

    def work(i: int) -> None:
        try:
            with Image.open(files[i]) as im:
                im = im.convert(mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                a = np.asarray(im)
        except OSError as e:
            raise ValueError(f"{files[i]}: cannot decode image ({e})") from None
        out[i] = a[None] if channels == 1 else a.transpose(2, 0, 1)

    workers = max(1, min(8, os.cpu_count() or 1, len(files) // 64))
    if workers == 1:
        for i in range(len(files)):
            work(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, range(len(files))))
    return out


def _split_dir(root: Path, split: str) -> Path:
    d = root / split
    if d.is_dir():
        return d
    alt = {"test": "val", "val": "test"}.get(split)
    if alt and (root / alt).is_dir():
        return root / alt
    raise DatasetNotFoundError(f"{root}: no '{split}' folder (expected {root / split}/<class>/<images>)")


def read_image_folder(
    root: Path, split: str, image_size: Optional[Tuple[int, int]] = None, channels: int = 3
) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Read ``root/<split>/<class>/*`` (``test`` falls back to ``val`` and vice versa).

    Returns ``(images uint8 [N, C, H, W], labels int64 [N], class names)``.
    """
    root = Path(root)
    split_dir = _split_dir(root, split)
    class_root = root / "train" if (root / "train").is_dir() else split_dir
    classes = _class_dirs(class_root)
    if not classes:
        raise DatasetNotFoundError(f"{class_root}: no class sub-folders")
    files, labels = scan_class_folders(split_dir, classes)
    return load_images(files, image_size, channels), labels, classes


def is_tiny_imagenet_dir(directory: Path) -> bool:
    """True when ``directory`` looks like ``tiny-imagenet-200`` (has ``train/`` or ``val/``)."""
    return (directory / "train").is_dir() or (directory / "val").is_dir()


def _tiny_classes(root: Path) -> List[str]:
    if (root / "train").is_dir():
        classes = _class_dirs(root / "train")
        if classes:
            return classes
    if (root / "wnids.txt").is_file():
        return sorted(w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip())
    raise DatasetNotFoundError(f"{root}: cannot determine the Tiny-ImageNet classes (no train/<wnid>/ or wnids.txt)")


def read_tiny_imagenet(
    root: Path, split: str, image_size: Optional[Tuple[int, int]] = None
) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Read Tiny-ImageNet ``train`` or ``test`` (= ``val/``) as uint8 ``[N, 3, H, W]``.

    Images are 64x64 natively; without ``image_size`` the size of the first image is used.

    Returns ``(images, labels int64 [N], wnids)`` with classes in sorted wnid order.
    """
    root = Path(root)
    classes = _tiny_classes(root)
    if split == "train":
        files, labels = scan_class_folders(root / "train", classes)
    else:
        val = root / "val"
        ann = val / "val_annotations.txt"
        if ann.is_file():
            index = {c: i for i, c in enumerate(classes)}
            files, lab = [], []
            for line_no, line in enumerate(ann.read_text().splitlines(), 1):
                parts = line.split("\t") if "\t" in line else line.split()
                if not line.strip():
                    continue
                if len(parts) < 2 or parts[1].strip() not in index:
                    raise ValueError(f"{ann}:{line_no}: expected 'file<TAB>wnid...' with a known wnid, got {line!r}")
                img_dir = val / "images" if (val / "images").is_dir() else val
                files.append(img_dir / parts[0].strip())
                lab.append(index[parts[1].strip()])
            if not files:
                raise DatasetNotFoundError(f"{ann}: no entries")
            labels = np.asarray(lab, dtype=np.int64)
        elif val.is_dir():
            files, labels = scan_class_folders(val, classes)
        else:
            raise DatasetNotFoundError(f"{root}: no val/ folder for the Tiny-ImageNet test split")
    missing = [f for f in files[:1] + files[-1:] if not f.is_file()]
    if missing:
        raise DatasetNotFoundError(f"{missing[0]}: listed image file is missing")
    return load_images(files, image_size, 3), labels, classes
