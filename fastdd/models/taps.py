"""Intermediate feature maps ("taps") of a network, for the style (DDM) and mutual-information (MIM4DD) terms."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn


def embed_with_taps(net: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``(embedding [N, F], [per-block maps [N, C_l, H_l, W_l], ...])`` of ``net`` on images ``x``.

    Models opt in by defining ``embed_with_taps`` (the ConvNet family does: one tap per block, after
    the activation and before pooling). Others raise a ``ValueError`` naming the model.
    """
    fn = getattr(net, "embed_with_taps", None)
    if fn is None:
        raise ValueError(f"model: {type(net).__name__} exposes no feature taps (embed_with_taps); the style and "
                         f"mutual-information terms need a ConvNet-family model")
    return fn(x)
