"""The saved synthetic-set format.

``DIR/synthetic.pt``          plain ``torch.save`` dict, loadable without fastdd
                              (``torch.load(p, weights_only=True)``):
                              ``images`` float32 [N, C, H, W] (normalised space) -- or, for a low-rank
                              set, ``factor_a`` [N, C, H, r] and ``factor_b`` [N, C, r, W] instead, with
                              ``images = factor_a @ factor_b`` (plain torch) --, ``labels`` int64 [N],
                              optional ``init_indices`` int64 [N] (training-set indices of a real init),
                              ``config`` (dict), ``metadata`` (dict: dataset, mean, std, method, ...).
``DIR/synthetic.safetensors`` the same tensors, with config/metadata as JSON strings in the header.
``DIR/synthetic.png``         a grid, one row per class, de-normalised to pixels.
``DIR/config.json``           the run's configuration and metadata.
``DIR/train/<class>/<i>.jpg`` optional (:func:`save_jpeg_folder`; ``fastdd distill`` writes it by default for
                              SRe2L / DWA): the set as an ImageNet-layout folder of 8-bit JPEGs, as SRe2L
                              and DWA release theirs, readable by any image-folder reader.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

from .checkpoint import atomic_write

SYNSET_FILE = "synthetic.pt"
SAFETENSORS_FILE = "synthetic.safetensors"
GRID_FILE = "synthetic.png"
CONFIG_FILE = "config.json"
JPEG_DIR = "train"
JPEG_QUALITY = 95
JPEG_MARKER = ".fastdd"  # dot-file in DIR/train: the folder was written by fastdd (image readers skip it)


def save_synset(out_dir: str | os.PathLike, tensors: dict, config: dict, metadata: dict) -> Path:
    """Write the synthetic set (see module docstring) into ``out_dir``; returns the ``.pt`` path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    payload = dict(tensors, config=dict(config), metadata=dict(metadata))
    path = atomic_write(out / SYNSET_FILE, lambda tmp: torch.save(payload, tmp))

    from safetensors.torch import save_file

    header = {"config": json.dumps(config), "metadata": json.dumps(metadata)}
    atomic_write(out / SAFETENSORS_FILE, lambda tmp: save_file(tensors, tmp, metadata=header))
    atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(
        json.dumps({"config": config, "metadata": metadata}, indent=2) + "\n"))
    mean, std = metadata.get("mean"), metadata.get("std")
    if mean is not None and std is not None:
        grid = image_grid(synset_images(tensors), tensors["labels"], mean, std, metadata.get("class_names"))
        atomic_write(out / GRID_FILE, lambda tmp: grid.save(tmp, format="PNG"))
    return path


def class_folder_names(num_classes: int, class_names: Sequence[str] | None = None) -> List[str]:
    """Folder names of the classes of a JPEG folder: the dataset's class names when there is one per class,
    each usable as a folder name (non-empty, no path separator, no leading dot), all distinct, and already
    in sorted order -- an image-folder reader numbers the classes by sorted folder name, so only then does
    it give back the set's labels (ImageNet's wnids qualify) --; otherwise zero-padded class ids
    (``000``, ``001``, ...; at least 3 digits)."""
    names = [str(n) for n in class_names] if class_names is not None else None
    if (names is not None and len(names) == num_classes and len(set(names)) == num_classes
            and names == sorted(names)
            and all(n and n == n.strip() and not n.startswith(".") and not set(n) & set("/\\\0") for n in names)):
        return names
    width = max(3, len(str(num_classes - 1)))
    return [f"{c:0{width}d}" for c in range(num_classes)]


def to_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """De-normalise images [N, C, H, W] to uint8 pixels [N, C, H, W]: round(255 clamp(x std + mean, 0, 1))."""
    images = images.detach().float().cpu()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((images * std_t + mean_t).clamp(0, 1) * 255).round().to(torch.uint8)


def save_jpeg_folder(out_dir: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                     std: Sequence[float], class_names: Sequence[str] | None = None, num_classes: int | None = None,
                     quality: int = JPEG_QUALITY) -> Path:
    """Write ``out_dir/train/<class>/<i>.jpg``: image i of each class (in set order, i zero-padded to at least
    3 digits), de-normalised (:func:`to_pixels`) and saved by Pillow as a baseline JPEG of ``quality``
    (1-95) without chroma subsampling (4:4:4: synthetic images carry colour detail at the pixel scale); 1-channel sets as grayscale, 3-channel as RGB. Folder names: :func:`class_folder_names`. The
    folder is written under a temporary name and then swapped in (an older ``train`` is moved aside first
    and removed after), so a reader never sees a partly written one. images [N, C, H, W] in the normalised space, labels [N]. Returns the ``train`` path."""
    from PIL import Image

    if not (isinstance(quality, int) and 1 <= quality <= 95):
        raise ValueError(f"jpeg quality: must be an int in 1..95, got {quality!r}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"jpeg folder: needs images [N, 1 or 3, H, W], got {tuple(images.shape)}")
    labels = labels.detach().cpu().to(torch.int64)
    k = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    folders = class_folder_names(k, class_names)
    pixels = to_pixels(images, mean, std).permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
    counts = torch.bincount(labels, minlength=k)
    width = max(3, len(str(int(counts.max()) - 1)))
    index = torch.zeros(k, dtype=torch.int64)
    jobs = []
    for row, c in enumerate(labels.tolist()):
        jobs.append((row, folders[c], f"{int(index[c]):0{width}d}.jpg"))
        index[c] += 1

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f".{JPEG_DIR}.*.tmp"):  # leftovers of a writer killed mid-way
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink()
    tmp = Path(tempfile.mkdtemp(prefix=f".{JPEG_DIR}.", suffix=".tmp", dir=out))
    try:
        for name in sorted(set(folders[c] for c in range(k) if counts[c] > 0)):
            (tmp / name).mkdir()
        (tmp / JPEG_MARKER).write_text("JPEG folder of a fastdd synthetic set (see synthetic.pt / config.json)\n")

        def write(job) -> None:
            row, folder, name = job
            arr = np.ascontiguousarray(pixels[row])
            img = Image.fromarray(arr[:, :, 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
            img.save(tmp / folder / name, format="JPEG", quality=quality, subsampling=0)

        workers = max(1, min(8, os.cpu_count() or 1, len(jobs) // 256))
        if workers == 1:
            for job in jobs:
                write(job)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(write, jobs))
        final = out / JPEG_DIR
        old = None
        if final.exists():
            if not is_fastdd_jpeg_folder(final):
                raise ValueError(f"{final}: exists and was not written by fastdd; not replacing it")
            old = Path(tempfile.mkdtemp(prefix=f".{JPEG_DIR}.", suffix=".tmp", dir=out))
            os.replace(final, old / JPEG_DIR)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def is_fastdd_jpeg_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a JPEG folder written by :func:`save_jpeg_folder` (it holds the marker file)."""
    return (Path(path) / JPEG_MARKER).is_file()


def remove_jpeg_folder(out_dir: str | os.PathLike) -> bool:
    """Remove ``out_dir/train`` when fastdd wrote it (True); anything else there is left alone (False)."""
    folder = Path(out_dir) / JPEG_DIR
    if folder.is_dir() and is_fastdd_jpeg_folder(folder):
        shutil.rmtree(folder)
        return True
    return False


def synset_images(tensors: dict) -> torch.Tensor:
    """The images [N, C, H, W] of a set dict: ``images`` itself, or ``factor_a @ factor_b`` for a low-rank set."""
    if "images" in tensors:
        return tensors["images"]
    if "factor_a" in tensors and "factor_b" in tensors:
        return torch.matmul(tensors["factor_a"].float(), tensors["factor_b"].float())
    raise ValueError("synthetic set: has neither 'images' nor the low-rank factors 'factor_a'/'factor_b'")


def stored_floats(tensors: dict) -> int:
    """Floats a set needs to store: the low-rank factors, else a stored (not decoded) tensor such as
    DANCE's ``stored_images``, else the images; labels and indices are not counted."""
    if "factor_a" in tensors and "factor_b" in tensors:
        return int(tensors["factor_a"].numel() + tensors["factor_b"].numel())
    return int(tensors.get("stored_images", tensors.get("images")).numel())


def load_synset(path: str | os.PathLike) -> dict:
    """Load ``synthetic.pt`` (a directory or the file) as the plain dict described above; a low-rank set
    gets its ``images`` reconstructed from the stored factors (the factors stay in the dict)."""
    path = Path(path)
    if path.is_dir():
        path = path / SYNSET_FILE
    if not path.exists():
        raise FileNotFoundError(f"synthetic set: {path} does not exist (run `fastdd distill` first)")
    from .checkpoint import load

    data = load(path)
    if not isinstance(data, dict):
        raise ValueError(f"synthetic set: {path} is not a dict; not a fastdd synthetic set")
    if "images" not in data and "factor_a" in data:
        data["images"] = synset_images(data)
    for key in ("images", "labels", "config", "metadata"):
        if key not in data:
            raise ValueError(f"synthetic set: {path} lacks the entry {key!r}; not a fastdd synthetic set")
    return data


def image_grid(images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
               class_names: Sequence[str] | None = None, per_row: int = 10, pad: int = 2, min_cell: int = 64,
               label_width: int = 90):
    """A PIL image, de-normalised: per class one or more rows of up to ``per_row`` images, each row led by
    the class name. Images are upscaled (nearest) to at least ``min_cell`` pixels so any IPC is legible."""
    from PIL import Image, ImageDraw

    images = images.detach().float().cpu()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = (images * std_t + mean_t).clamp(0, 1)
    _, channels, h, w = pixels.shape
    scale = max(1, -(-min_cell // max(h, w)))
    ch, cw = h * scale, w * scale
    rows = []  # (class, images of that row)
    for c in sorted(set(labels.tolist())):
        members = pixels[labels == c]
        rows += [(c, members[k:k + per_row]) for k in range(0, members.shape[0], per_row)]
    cols = max(r[1].shape[0] for r in rows)
    canvas = Image.new("RGB", (label_width + cols * (cw + pad) + pad, len(rows) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (c, members) in enumerate(rows):
        y = pad + row * (ch + pad)
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        draw.text((pad, y + ch // 2 - 5), str(name)[:14], fill="black")
        for col, img in enumerate(members):
            arr = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            arr = (arr * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            if channels == 1:
                arr = np.repeat(arr, 3, axis=2)
            canvas.paste(Image.fromarray(np.ascontiguousarray(arr[:, :, :3])), (label_width + pad + col * (cw + pad), y))
    return canvas
