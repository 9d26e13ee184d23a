"""Small helpers shared by the model definitions (argument parsing, input checks)."""
from __future__ import annotations

from typing import Tuple, Union

import torch

from ..validation import check_positive_int, check_tensor

ImSize = Union[int, Tuple[int, int]]


def parse_im_size(im_size: ImSize) -> Tuple[int, int]:
    """Return ``im_size`` as an ``(H, W)`` tuple of positive ints (an int ``s`` means ``(s, s)``)."""
    if isinstance(im_size, int) and not isinstance(im_size, bool):
        im_size = (im_size, im_size)
    try:
        h, w = im_size  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"im_size: expected an int or an (H, W) pair, got {im_size!r}") from None
    check_positive_int("im_size[0]", h)
    check_positive_int("im_size[1]", w)
    return int(h), int(w)


def check_images(x: torch.Tensor, channel: int, im_size: Tuple[int, int]) -> torch.Tensor:
    """Check that ``x`` is an image batch ``[N, channel, H, W]`` of the size the model was built for."""
    return check_tensor("x", x, shape=(None, channel, im_size[0], im_size[1]))
