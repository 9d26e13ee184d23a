"""Class-indexed sampling of real images that stays on the data's device.

At construction the dataset indices are arranged once in a padded table ``[K, max_count]`` (row c holds
class c's indices in dataset order, padded with ``-1``). A draw of n images per class then takes

    keys = U[0, 1) of shape [K, max_count] from the caller's generator, +inf on padding
    pos  = the n smallest keys per row (topk)           -> a uniformly random n-subset, in random order

which is exactly "a random permutation of the class's indices truncated to n" (sampling without
replacement inside a class, independent across draws), for all classes in one batched op and without
a Python loop over classes. The keys are drawn on the generator's device; the chosen positions are moved
to the data's device for the gather. The global RNG is never used.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch

from ..validation import check_labels, check_positive_int, check_tensor

if TYPE_CHECKING:
    from .dataset import ImageDataset


class ClassSampler:
    """Draw ``n`` random images of every class at once from tensors kept on their device.

    ``images``: ``[N, ...]`` (typically ``[N, C, H, W]``), any dtype; ``labels``: integer ``[N]`` in
    ``[0, num_classes)``; every class must have at least one image.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        check_tensor("images", images)
        if images.dim() < 1:
            raise ValueError("images: expected [N, ...], got a 0-d tensor")
        num_classes = check_positive_int("num_classes", num_classes)
        check_labels("labels", labels, num_classes, length=images.shape[0])
        self.images = images
        self.labels = labels.to(device=images.device, dtype=torch.int64)
        self.num_classes = num_classes
        device = images.device

        counts = torch.bincount(self.labels, minlength=num_classes)
        counts_list = counts.tolist()
        empty = [c for c, n in enumerate(counts_list) if n == 0]
        if empty:
            more = f" (and {len(empty) - 1} more: {empty[1:6]})" if len(empty) > 1 else ""
            raise ValueError(f"labels: class {empty[0]} has no images{more}; every class needs at least one")
        self._counts_list = counts_list
        self.class_counts: torch.Tensor = counts  # LongTensor [K] on the data's device
        self._min_class = min(range(num_classes), key=counts_list.__getitem__)
        self.max_count = max(counts_list)

        # padded index table [K, max_count]: row c = indices of class c in dataset order, then -1
        order = torch.argsort(self.labels, stable=True)
        sorted_labels = self.labels[order]
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(self.labels.shape[0], device=device) - starts[sorted_labels]
        table = torch.full((num_classes, self.max_count), -1, dtype=torch.int64, device=device)
        table[sorted_labels, pos] = order
        self.index_table = table
        self._pad: Dict[torch.device, torch.Tensor] = {}
        self._label_cache: Dict[int, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the data (and of every returned tensor)."""
        return self.images.device

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _check_n(self, n_per_class: int) -> int:
        n = check_positive_int("n_per_class", n_per_class)
        smallest = self._counts_list[self._min_class]
        if n > smallest:
            raise ValueError(
                f"n_per_class={n} exceeds class {self._min_class} which has {smallest} images "
                f"(the smallest class); use n_per_class <= {smallest}"
            )
        return n

    def _padding_mask(self, device: torch.device) -> torch.Tensor:
        """Bool ``[K, max_count]``, True on padding slots, cached per device."""
        mask = self._pad.get(device)
        if mask is None:
            mask = (self.index_table < 0).to(device)
            self._pad[device] = mask
        return mask

    def sample_indices(self, n_per_class: int, generator: torch.Generator) -> torch.Tensor:
        """Random dataset indices, int64 ``[K, n]``: row c is n distinct images of class c in random order.

        Random keys come from ``generator`` on its own device; the result is on the data's device.
        Raises ``ValueError`` if ``n_per_class`` exceeds the smallest class.
        """
        n = self._check_n(n_per_class)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        gdev = generator.device
        keys = torch.rand(self.num_classes, self.max_count, generator=generator, device=gdev)
        keys.masked_fill_(self._padding_mask(gdev), float("inf"))
        pos = keys.topk(n, dim=1, largest=False, sorted=True).indices.to(self.device)
        return torch.gather(self.index_table, 1, pos)

    def sample(self, n_per_class: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw n images of every class: ``(images [K*n, ...], labels int64 [K*n])`` in class-major order.

        Rows ``c*n .. (c+1)*n - 1`` are class c; no image repeats within a class in one draw.
        """
        idx = self.sample_indices(n_per_class, generator).reshape(-1)
        return self.images.index_select(0, idx), self._labels_for(n_per_class)

    def first_indices(self, n_per_class: int) -> torch.Tensor:
        """The first n indices of every class in dataset order, int64 ``[K, n]`` (deterministic init)."""
        n = self._check_n(n_per_class)
        return self.index_table[:, :n].clone()

    def _labels_for(self, n: int) -> torch.Tensor:
        lab = self._label_cache.get(n)
        if lab is None:
            lab = torch.arange(self.num_classes, device=self.device).repeat_interleave(n)
            self._label_cache[n] = lab
        return lab.clone()

    def __repr__(self) -> str:
        return (
            f"ClassSampler(n={len(self)}, num_classes={self.num_classes}, "
            f"class_sizes={min(self._counts_list)}..{self.max_count}, device={self.device})"
        )


def stratified_subset(dataset: ImageDataset, per_class: int, generator: Optional[torch.Generator] = None
                      ) -> ImageDataset:
    """``per_class`` images of every class (random with ``generator``, else the first ones in order)."""
    sampler = ClassSampler(dataset.images, dataset.labels, dataset.num_classes)
    idx = sampler.first_indices(per_class) if generator is None else sampler.sample_indices(per_class, generator)
    idx = idx.reshape(-1)
    return dataclasses.replace(dataset, images=dataset.images[idx], labels=dataset.labels[idx])
