"""Datasets for fastdd: readers, normalisation statistics and an on-device class-indexed sampler.

- :func:`load_dataset` -- one split of a named dataset (``dataset_names()``) as an :class:`ImageDataset`
  (images float32 ``[N, C, H, W]`` normalised per channel, labels int64 ``[N]``).
- :func:`from_torch_dataset` -- the same from any map-style torch ``Dataset`` (torchvision's included).
- :class:`LazyImageFolder` -- an image-folder split decoded on demand (``load_dataset(..., lazy=True)``):
  a torch ``Dataset`` for DataLoader workers, with the metadata of :class:`ImageDataset` and no ``images``.
- :class:`ClassSampler` -- n random images of every class in one batched draw, data kept on its device.
- :class:`DatasetNotFoundError` -- raised (a ``FileNotFoundError``) with the directories searched.

Readers (IDX, CIFAR pickles, image folders, digits) live in their own modules; the search order for
dataset directories is documented in :mod:`fastdd.data.paths`, the statistics in :mod:`fastdd.data.stats`.
"""
from .dataset import ImageDataset, normalize_pixels
from .lazy import LazyImageFolder, is_lazy, make_loader
from .paths import DatasetNotFoundError, search_parents
from .registry import canonical_name, dataset_names, load_dataset
from .sampler import ClassSampler, stratified_subset
from .stats import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATION, get_stats
from .torch_dataset import from_torch_dataset

__all__ = [
    "ClassSampler",
    "DatasetNotFoundError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDataset",
    "LazyImageFolder",
    "NORMALIZATION",
    "canonical_name",
    "dataset_names",
    "from_torch_dataset",
    "get_stats",
    "is_lazy",
    "load_dataset",
    "make_loader",
    "normalize_pixels",
    "search_parents",
    "stratified_subset",
]
