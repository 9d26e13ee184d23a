"""IDX files (MNIST, Fashion-MNIST), plain or gzipped.

Format: two zero bytes, a dtype code byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64), a byte with the number of dimensions d, then d big-endian uint32 sizes,
then the values in row-major order, big-endian.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from .paths import DatasetNotFoundError

IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: IDX file stems per split (``train-images-idx3-ubyte`` etc.; a ``.gz`` suffix is optional).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class IDXFormatError(ValueError):
    """An IDX file is malformed (bad magic number, dtype code, or size)."""


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an (already decompressed) IDX file into a writable native-endian array.

    Returns an array of shape ``dims`` from the header, dtype from the header's type code.
    """
    if len(data) < 4:
        raise IDXFormatError(f"{source}: too short for an IDX header ({len(data)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in IDX_DTYPES:
        raise IDXFormatError(
            f"{source}: bad IDX magic number 0x{int.from_bytes(data[:4], 'big'):08x} "
            f"(expected 0x0000 then a type code in {[hex(c) for c in IDX_DTYPES]} and the number of "
            f"dimensions); is this really an IDX file (or a gzip file without the .gz suffix)?"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{source}: truncated header ({len(data)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header]) if ndim else ()
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise IDXFormatError(
            f"{source}: header says shape {tuple(dims)} of {dtype.name} ({expected} bytes of data) but the "
            f"file holds {len(data) - header} bytes after the header"
        )
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header).reshape(dims)
    # one copy: native byte order and writable (torch.from_numpy needs writable memory)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read one IDX file (gzipped if it starts with the gzip magic, whatever its name).

    Returns a numpy array with the header's shape and dtype (native byte order).
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise IDXFormatError(f"{path}: corrupt gzip stream ({e})") from None
    return parse_idx(raw, str(path))


def find_idx_file(directory: Path, stem: str) -> Optional[Path]:
    """``directory/stem`` or ``directory/stem.gz`` (plain first), or None."""
    for name in (stem, stem + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    # torchvision-style names use a dot before idx: ``train-images.idx3-ubyte``
    alt = stem.replace("-idx", ".idx")
    for name in (alt, alt + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    return None


def is_idx_dir(directory: Path) -> bool:
    """True when ``directory`` holds the images file of at least one IDX split."""
    return any(find_idx_file(directory, imgs) is not None for imgs, _ in IDX_FILES.values())


def read_idx_split(directory: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Read one split of an MNIST-style IDX directory.

    Returns ``(images uint8 [N, 1, H, W], labels int64 [N])``. Raises :class:`DatasetNotFoundError` if a
    file is missing and :class:`IDXFormatError` if shapes or dtypes are wrong.
    """
    img_stem, lbl_stem = IDX_FILES[split]
    paths = []
    for stem in (img_stem, lbl_stem):
        p = find_idx_file(directory, stem)
        if p is None:
            raise DatasetNotFoundError(f"{directory}: missing {stem} (or {stem}.gz) for split '{split}'")
        paths.append(p)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IDXFormatError(f"{paths[0]}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise IDXFormatError(f"{paths[1]}: expected integer labels [N], got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise IDXFormatError(
            f"{directory}: {images.shape[0]} images in {paths[0].name} but {labels.shape[0]} labels in {paths[1].name}"
        )
    return images[:, None], labels.astype(np.int64)
