"""Class-folder image trees (ImageNet layout) and Tiny-ImageNet.

Generic layout: ``root/<split>/<class>/**/*.{png,jpg,jpeg,bmp}`` (extension case-insensitive). Class
names are the sorted sub-folder names of ``root/train`` when it exists (so every split gets the same
label ids), else of ``root/<split>``.

Tiny-ImageNet (``tiny-imagenet-200/``): ``train/<wnid>/images/*.JPEG`` (or ``train/<wnid>/*``); the
validation split is either ``val/val_annotations.txt`` (``file<TAB>wnid<TAB>...`` lines) with the
images in ``val/images/``, or ``val/<wnid>/*``. As in DM, the validation split serves as the test
split (``split="test"`` and ``split="val"`` both read ``val/``).

Both layouts are read in two steps: a *scan* (:func:`scan_image_folder`, :func:`scan_tiny_imagenet`: the
sorted file list and labels, O(files) memory) and a *decode* (:func:`decode_image`, one file to uint8
``[C, H, W]``). :func:`load_images` decodes a whole list into memory; :class:`LazyImageFolder` (in
:mod:`fastdd.data.lazy`) decodes one image per ``__getitem__``. Both resize with the same rule:

- ``resize="direct"`` (default, as before): bilinear resize straight to ``(H, W)`` (aspect ratio not kept);
- ``resize="center_crop"``: ImageNet's evaluation transform -- scale (bilinear) so that the shorter side
  is ``side / crop_fraction`` (224 / 0.875 = 256), then crop the centre ``(H, W)``.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .paths import DatasetNotFoundError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg"})
RESIZE_MODES = ("direct", "center_crop")
DECODERS = ("auto", "pil", "torchvision")


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


def check_resize(resize: str, crop_fraction: float) -> None:
    """Validate the resize rule (module docstring)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize: expected one of {list(RESIZE_MODES)}, got {resize!r}")
    if not 0.0 < float(crop_fraction) <= 1.0:
        raise ValueError(f"crop_fraction: must lie in (0, 1], got {crop_fraction}")


def _center_crop_box(in_hw: Tuple[int, int], out_hw: Tuple[int, int], crop_fraction: float):
    """``(scaled (h, w), crop (top, left))`` of the center-crop rule for an ``in_hw`` image."""
    (ih, iw), (h, w) = in_hw, out_hw
    scale = max(h / ih, w / iw) / crop_fraction
    sh, sw = max(h, round(ih * scale)), max(w, round(iw * scale))
    return (sh, sw), (int(round((sh - h) / 2.0)), int(round((sw - w) / 2.0)))


def _torchvision_io():
    """``torchvision.io`` if torchvision imports here, else None (torchvision is optional)."""
    global _TV_IO
    if _TV_IO is False:
        try:
            import torchvision.io as tv_io  # noqa: PLC0415

            _TV_IO = tv_io
        except Exception:  # ImportError, or a torchvision built against another torch
            _TV_IO = None
    return _TV_IO


_TV_IO = False  # not probed yet


def resolve_decoder(decoder: str) -> str:
    """``"pil"`` or ``"torchvision"``: ``auto`` takes torchvision.io (JPEG files) where it imports."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder: expected one of {list(DECODERS)}, got {decoder!r}")
    if decoder == "auto":
        return "torchvision" if _torchvision_io() is not None else "pil"
    if decoder == "torchvision" and _torchvision_io() is None:
        raise ValueError("decoder: 'torchvision' was asked for but torchvision does not import here; use 'pil'")
    return decoder


def image_size_of(path: Path) -> Tuple[int, int]:
    """``(H, W)`` of an image file (reads the header only)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except OSError as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from None


def _decode_pil(path, channels: int, size: Tuple[int, int], resize: str, crop_fraction: float) -> np.ndarray:
    from PIL import Image

    h, w = size
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if resize == "center_crop":
            (sh, sw), (top, left) = _center_crop_box((im.size[1], im.size[0]), size, crop_fraction)
            if (sh, sw) != (im.size[1], im.size[0]):
                im = im.resize((sw, sh), Image.BILINEAR)
            if (sh, sw) != (h, w):
                im = im.crop((left, top, left + w, top + h))
        elif im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
        a = np.asarray(im)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def _decode_torchvision(path, channels: int, size: Tuple[int, int], resize: str, crop_fraction: float) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    tv_io = _torchvision_io()
    mode = tv_io.ImageReadMode.GRAY if channels == 1 else tv_io.ImageReadMode.RGB
    x = tv_io.decode_jpeg(tv_io.read_file(str(path)), mode=mode)  # uint8 [C, H, W]
    h, w = size
    ih, iw = int(x.shape[1]), int(x.shape[2])
    box = ((h, w), (0, 0)) if resize == "direct" else _center_crop_box((ih, iw), size, crop_fraction)
    (sh, sw), (top, left) = box
    if (sh, sw) != (ih, iw):
        x = F.interpolate(x[None].float(), size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)[0]
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x[:, top:top + h, left:left + w].contiguous().numpy()


def decode_image(path, channels: int, size: Tuple[int, int], resize: str = "direct", crop_fraction: float = 0.875,
                 decoder: str = "pil") -> np.ndarray:
    """Decode one image file to uint8 ``[C, H, W]`` (``channels`` 1: L, 3: RGB; ``size=(H, W)``).

    ``resize``: ``direct`` or ``center_crop`` (module docstring). ``decoder``: ``pil`` (Pillow, bilinear) or
    ``torchvision`` (``torchvision.io.decode_jpeg`` for JPEG files, antialiased bilinear in torch, Pillow
    for the other formats); the two differ by rounding. A file that does not decode raises a ValueError
    naming it.
    """
    try:
        if decoder == "torchvision" and os.path.splitext(str(path))[1].lower() in JPEG_EXTENSIONS:
            return _decode_torchvision(path, channels, size, resize, crop_fraction)
        return _decode_pil(path, channels, size, resize, crop_fraction)
    except (OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from None


def load_images(
    files: Sequence[Path], image_size: Optional[Tuple[int, int]] = None, channels: int = 3,
    resize: str = "direct", crop_fraction: float = 0.875,
) -> np.ndarray:
    """Decode image files with Pillow into uint8 ``[N, C, H, W]``.

    Every image is converted to RGB (``channels=3``) or grayscale (``channels=1``) and resized
    (bilinear) to ``image_size=(H, W)`` by the ``resize`` rule (module docstring); when ``image_size`` is
    None it is the size of ``files[0]``. Decoding runs in a small thread pool (Pillow releases the GIL
    while decoding).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels: image folders are read as 1 (L) or 3 (RGB) channels, got {channels}")
    check_resize(resize, crop_fraction)
    if not files:
        raise ValueError("files: empty")
    if image_size is None:
        image_size = image_size_of(files[0])
    h, w = image_size
    out = np.empty((len(files), channels, h, w), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = decode_image(files[i], channels, (h, w), resize, crop_fraction)

    run_threaded(len(files), work, max(1, min(8, os.cpu_count() or 1, len(files) // 64)))
    return out


def run_threaded(n: int, work, workers: int) -> None:
    """Call ``work(i)`` for every i in ``range(n)``: in a pool of ``workers`` threads, or in this thread when
    ``workers`` is 1 or n < 2 (Pillow releases the GIL while decoding, so threads overlap the decodes)."""
    if workers <= 1 or n < 2:
        for i in range(n):
            work(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, range(n)))


def _split_dir(root: Path, split: str) -> Path:
    d = root / split
    if d.is_dir():
        return d
    alt = {"test": "val", "val": "test"}.get(split)
    if alt and (root / alt).is_dir():
        return root / alt
    raise DatasetNotFoundError(f"{root}: no '{split}' folder (expected {root / split}/<class>/<images>)")


def scan_image_folder(root: Path, split: str) -> Tuple[List[Path], np.ndarray, List[str]]:
    """The files of ``root/<split>/<class>/**`` (``test`` falls back to ``val`` and vice versa), no decoding.

    Returns ``(files, labels int64 [N], class names)``; the order is :func:`read_image_folder`'s.
    """
    root = Path(root)
    split_dir = _split_dir(root, split)
    class_root = root / "train" if (root / "train").is_dir() else split_dir
    classes = _class_dirs(class_root)
    if not classes:
        raise DatasetNotFoundError(f"{class_root}: no class sub-folders")
    files, labels = scan_class_folders(split_dir, classes)
    return files, labels, classes


def read_image_folder(
    root: Path, split: str, image_size: Optional[Tuple[int, int]] = None, channels: int = 3,
    resize: str = "direct", crop_fraction: float = 0.875,
) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Read ``root/<split>/<class>/*`` (``test`` falls back to ``val`` and vice versa) into memory.

    Returns ``(images uint8 [N, C, H, W], labels int64 [N], class names)``.
    """
    files, labels, classes = scan_image_folder(root, split)
    return load_images(files, image_size, channels, resize, crop_fraction), labels, classes


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


def scan_tiny_imagenet(root: Path, split: str) -> Tuple[List[Path], np.ndarray, List[str]]:
    """The files of Tiny-ImageNet ``train`` or ``test`` (= ``val/``), no decoding.

    Returns ``(files, labels int64 [N], wnids)`` with classes in sorted wnid order.
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
    return files, labels, classes


def read_tiny_imagenet(
    root: Path, split: str, image_size: Optional[Tuple[int, int]] = None,
    resize: str = "direct", crop_fraction: float = 0.875,
) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Read Tiny-ImageNet ``train`` or ``test`` (= ``val/``) as uint8 ``[N, 3, H, W]``.

    Images are 64x64 natively; without ``image_size`` the size of the first image is used.

    Returns ``(images, labels int64 [N], wnids)`` with classes in sorted wnid order.
    """
    files, labels, classes = scan_tiny_imagenet(root, split)
    return load_images(files, image_size, 3, resize, crop_fraction), labels, classes
