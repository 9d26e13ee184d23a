"""Image folders read on demand: :class:`LazyImageFolder`, a map-style torch ``Dataset``.

An ImageNet-scale tree (1.28 M training JPEGs) does not fit in memory as float32 tensors. The lazy
dataset holds only the index -- the sorted file paths (one numpy byte-string array, so that forked
DataLoader workers share it without copy-on-write growth) and the int64 labels -- and decodes, converts
(RGB or L), resizes (:mod:`fastdd.data.folder`'s ``resize`` rule) and normalises one image per
``__getitem__``. Memory is O(files), never O(pixels).

Decoding: Pillow, or ``torchvision.io.decode_jpeg`` for JPEG files where torchvision imports
(``decoder="auto"``); ``decoder="pil"`` reproduces the in-memory reader bit for bit.

Who reads what:

- evaluation's test pass streams it through a ``DataLoader`` (:func:`make_loader`: ``num_workers`` from
  ``EvalConfig.workers``, pinned memory on CUDA), every batch through all stacked models;
- a random real baseline or a real-image initialisation needs a few images per class:
  :meth:`LazyImageFolder.sample_indices` (the same indices as :class:`~fastdd.data.ClassSampler` on the
  same labels and generator) then :meth:`LazyImageFolder.images_at`, or :meth:`class_images` for one class.
  Only those files are opened.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..validation import check_positive_int
from .dataset import ImageDataset, _stats_view
from .folder import check_resize, decode_image, image_size_of, resolve_decoder, run_threaded


def is_lazy(dataset) -> bool:
    """Whether ``dataset`` is read on demand (a :class:`LazyImageFolder`: no ``images`` tensor), not in memory."""
    return getattr(dataset, "lazy", False) is True


class LazyImageFolder(Dataset):
    """A labelled image split decoded on demand; ``ds[i]`` is ``(float32 [C, H, W], int label)``.

    ``files``: image paths, ``labels``: int64 ``[N]`` in ``[0, len(class_names))`` (usually from
    :func:`fastdd.data.folder.scan_image_folder`). ``channels = len(mean)`` (1: L, 3: RGB). Pixels are
    ``(x/255 - mean_c)/std_c`` exactly as :func:`fastdd.data.normalize_pixels` computes them.
    ``image_size=(H, W)``: None takes the first file's size. ``resize``/``crop_fraction``: the rule of
    :mod:`fastdd.data.folder`. ``decoder``: ``auto`` | ``pil`` | ``torchvision``.

    It carries the metadata of :class:`ImageDataset` (``name``, ``split``, ``labels``, ``num_classes``,
    ``class_names``, ``mean``, ``std``, ``channels``, ``image_size``, ``device`` = cpu, ``class_counts()``,
    ``normalize``/``denormalize``) but no ``images`` tensor. Picklable (DataLoader workers, any start
    method); no randomness of its own: draws take an explicit generator.
    """

    lazy = True

    def __init__(self, files: Sequence[Union[str, os.PathLike]], labels, class_names: Sequence[str], *,
                 name: str, split: str, mean: Sequence[float], std: Sequence[float],
                 image_size: Optional[Tuple[int, int]] = None, resize: str = "direct",
                 crop_fraction: float = 0.875, decoder: str = "auto"):
        check_resize(resize, crop_fraction)
        self.decoder = resolve_decoder(decoder)
        if not len(files):
            raise ValueError(f"{name} {split}: no image files")
        self._paths = np.array([os.fsencode(os.fspath(f)) for f in files], dtype=np.bytes_)
        labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if labels_t.shape != (len(files),):
            raise ValueError(f"labels: expected [{len(files)}] labels, got shape {tuple(labels_t.shape)}")
        self.class_names = [str(c) for c in class_names]
        self.num_classes = check_positive_int("num_classes", len(self.class_names))
        if int(labels_t.min()) < 0 or int(labels_t.max()) >= self.num_classes:
            raise ValueError(f"{name} {split}: labels span [{int(labels_t.min())}, {int(labels_t.max())}] but "
                             f"there are {self.num_classes} classes")
        self.labels = labels_t
        self.name, self.split = name, split
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise ValueError(f"mean/std: need 1 (grayscale) or 3 (RGB) values each, got {len(self.mean)} and "
                             f"{len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: must be positive, got {self.std}")
        self.image_size = tuple(image_size) if image_size is not None else image_size_of(self.path(0))
        self.resize, self.crop_fraction = resize, float(crop_fraction)
        self._sampler = None

    # ------------------------------------------------------------------------------------------ metadata
    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __len__(self) -> int:
        return int(self._paths.shape[0])

    def __repr__(self) -> str:
        return (f"LazyImageFolder(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={(self.channels, *self.image_size)}, num_classes={self.num_classes}, "
                f"resize={self.resize!r}, decoder={self.decoder!r})")

    def path(self, index: int) -> Path:
        """The file of item ``index``."""
        return Path(os.fsdecode(self._paths[index]))

    @property
    def files(self) -> List[Path]:
        """All file paths in dataset order (builds a list: O(N))."""
        return [Path(os.fsdecode(p)) for p in self._paths]

    def class_counts(self) -> torch.Tensor:
        """Number of images per class, int64 ``[num_classes]``."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    denormalize = ImageDataset.denormalize
    normalize = ImageDataset.normalize

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_sampler"] = None  # rebuilt on demand
        return state

    # ------------------------------------------------------------------------------------------ reading
    def pixels(self, index: int) -> np.ndarray:
        """Item ``index`` decoded and resized, uint8 ``[C, H, W]`` (not normalised)."""
        return decode_image(self.path(index), self.channels, self.image_size, self.resize, self.crop_fraction,
                            self.decoder)

    def _normalise(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.tensor(pixels, dtype=torch.float32).div_(255.0)  # a copy (Pillow's arrays are read-only)
        return x.sub_(_stats_view(self.mean, x)).div_(_stats_view(self.std, x))

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        return self._normalise(self.pixels(index)), int(self.labels[index])

    def images_at(self, indices, threads: int = 0) -> torch.Tensor:
        """Items ``indices`` (any int sequence or tensor, any shape, flattened) as normalised float32
        ``[n, C, H, W]``; only those files are opened. ``threads``: decoding threads (0: up to 8)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()
        out = torch.empty((len(idx), self.channels, *self.image_size), dtype=torch.float32)

        def work(j: int) -> None:
            out[j] = self[idx[j]][0]

        run_threaded(len(idx), work, threads or max(1, min(8, os.cpu_count() or 1, len(idx) // 16)))
        return out

    # ------------------------------------------------------------------------------------------ sampling
    def _class_sampler(self):
        from .sampler import ClassSampler

        if self._sampler is None:  # the labels stand in for the images: only the index table is used
            self._sampler = ClassSampler(self.labels, self.labels, self.num_classes)
        return self._sampler

    def sample_indices(self, n_per_class: int, generator: torch.Generator) -> torch.Tensor:
        """``n_per_class`` distinct random indices of every class, int64 ``[K, n]`` on the CPU: exactly
        ``ClassSampler(images, labels, K).sample_indices(n, generator)`` of the in-memory dataset."""
        return self._class_sampler().sample_indices(n_per_class, generator).cpu()

    def first_indices(self, n_per_class: int) -> torch.Tensor:
        """The first n indices of every class in dataset order, int64 ``[K, n]``."""
        return self._class_sampler().first_indices(n_per_class)

    def class_images(self, k: int, ipc: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """``ipc`` distinct random images of class ``k``: ``(float32 [ipc, C, H, W], indices int64 [ipc])``.

        The choice is a uniform random ``ipc``-subset (random order) drawn from ``generator`` (its own
        device; keys ``U[0, 1)`` for the class's images, the ``ipc`` smallest); only those ``ipc`` files
        are decoded."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        k = int(k)
        if not 0 <= k < self.num_classes:
            raise ValueError(f"k: class {k} is not in [0, {self.num_classes})")
        ipc = check_positive_int("ipc", ipc)
        members = torch.nonzero(self.labels == k).flatten()
        if ipc > members.numel():
            raise ValueError(f"ipc={ipc} exceeds class {k} ({self.class_names[k]}), which has {members.numel()} "
                             "images")
        keys = torch.rand(members.numel(), generator=generator, device=generator.device)
        pos = keys.topk(ipc, largest=False, sorted=True).indices.cpu()
        idx = members[pos]
        return self.images_at(idx), idx


def default_stream_batch(device: torch.device) -> int:
    """Rows per batch when streaming a lazy split with ``test_batch_size`` 0."""
    return 256 if torch.device(device).type != "cpu" else 64


def make_loader(dataset: Dataset, batch_size: int, workers: int = 0, device: Union[str, torch.device] = "cpu",
                ) -> DataLoader:
    """An in-order ``DataLoader`` over ``dataset`` (no shuffling: nothing random), ``workers`` decoding
    processes, pinned memory when ``device`` is CUDA."""
    workers = check_positive_int("workers", workers, minimum=0)
    return DataLoader(dataset, batch_size=check_positive_int("batch_size", batch_size), shuffle=False,
                      num_workers=workers, pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=False, drop_last=False)
