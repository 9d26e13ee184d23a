"""Per-channel normalisation statistics.

Images are turned into floats in [0, 1] and standardised per channel, ``x_norm = (x - mean_c) / std_c``
(DM/DANCE spec, section 1.1). The values below are the spec's table, verbatim.

``digits`` (scikit-learn's bundled 8x8 digits, pixel values 0..16 divided by 16) is not in the spec: its
mean and (population, ddof=0) standard deviation were computed once over all pixels of fastdd's
*train* split of digits (the fixed stratified 75/25 split of :mod:`fastdd.data.digits`, 1347 images)
and rounded to four decimals: mean 0.306229, std 0.376793. ``tests/test_data.py`` recomputes them.
"""
from __future__ import annotations

from typing import Dict, Tuple

Stats = Tuple[Tuple[float, ...], Tuple[float, ...]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: canonical dataset name -> (mean per channel, std per channel)
NORMALIZATION: Dict[str, Stats] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2861,), (0.3530,)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
    "digits": ((0.3062,), (0.3768,)),
}


def get_stats(name: str) -> Stats:
    """Return ``(mean, std)`` tuples (one float per channel) for a canonical dataset name."""
    try:
        return NORMALIZATION[name]
    except KeyError:
        raise ValueError(
            f"name: no normalisation statistics for '{name}'; known: {', '.join(sorted(NORMALIZATION))}"
        ) from None
