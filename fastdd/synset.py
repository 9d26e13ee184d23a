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
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .checkpoint import atomic_write

SYNSET_FILE = "synthetic.pt"
SAFETENSORS_FILE = "synthetic.safetensors"
GRID_FILE = "synthetic.png"
CONFIG_FILE = "config.json"


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
