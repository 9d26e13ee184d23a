"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download needed).

Pixel values are integers 0..16 and are divided by 16 (not 255). The train/test split is a fixed
stratified 75/25 split: for each class c in turn, its indices (dataset order) are permuted with one
``numpy.random.RandomState(0)`` stream (NumPy's legacy generator, whose stream is frozen across
versions) and the first ``round(0.25 * n_c)`` go to test. Both splits keep dataset order.
That gives 1347 train and 450 test images; the normalisation constants in
:mod:`fastdd.data.stats` were computed from this train split.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

SPLIT_SEED = 0
TEST_FRACTION = 0.25


def digits_split_indices(y: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Indices into ``sklearn.datasets.load_digits()`` of the fixed train and test splits (int64, sorted).

    ``y`` is the digits target vector [1797] (loaded when not given).
    """
    if y is None:
        from sklearn.datasets import load_digits

        y = load_digits().target
    rs = np.random.RandomState(SPLIT_SEED)
    test = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        perm = rs.permutation(len(idx))
        test.append(idx[perm[: int(round(TEST_FRACTION * len(idx)))]])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask).astype(np.int64), test_idx


def read_digits(split: str) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """One split of the digits: ``(pixels float32 [N, 1, 8, 8] in 0..16, labels int64 [N], names '0'..'9')``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    train_idx, test_idx = digits_split_indices(d.target)
    idx = train_idx if split == "train" else test_idx
    images = d.images[idx].astype(np.float32)[:, None]
    labels = d.target[idx].astype(np.int64)
    return images, labels, [str(i) for i in range(10)]
